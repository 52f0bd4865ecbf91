//! `kiln snapshot ...`.
use crate::cli::Home;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum SnapshotCommand {}

pub fn run(_home: &Home, c: SnapshotCommand) -> anyhow::Result<()> {
    match c {}
}
