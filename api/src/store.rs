//! `kiln store ...` and `kiln remote ...`.
use crate::cli::Home;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum StoreCommand {}

#[derive(Subcommand)]
pub enum RemoteCommand {}

pub fn run(_home: &Home, c: StoreCommand) -> anyhow::Result<()> {
    match c {}
}

pub fn run_remote(_home: &Home, c: RemoteCommand) -> anyhow::Result<()> {
    match c {}
}
