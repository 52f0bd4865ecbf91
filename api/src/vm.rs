//! `kiln vm ...`.
use crate::cli::Home;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum VmCommand {}

pub fn run(_home: &Home, c: VmCommand) -> anyhow::Result<()> {
    match c {}
}
