//! `kiln image ...` and `kiln build`.
use crate::cli::Home;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum ImageCommand {}

/// Build a VM image from a Dockerfile.
#[derive(Args)]
pub struct BuildArgs {}

pub fn run(_home: &Home, c: ImageCommand) -> anyhow::Result<()> {
    match c {}
}

pub fn build(_home: &Home, _args: BuildArgs) -> anyhow::Result<()> {
    anyhow::bail!("kiln build is not implemented yet")
}
