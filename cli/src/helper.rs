//! `kiln __helper DIR` (hidden): a process the runtime started ([`kiln_runtime::helpers`]). It
//! reads the typed spec in DIR and calls the library function it names; no flags to parse.

use crate::cli::Home;
use anyhow::Result;
use kiln_runtime::helpers::{self, HelperSpec};
use std::path::Path;

pub fn run(dir: &Path) -> Result<()> {
    match helpers::read_spec(dir)? {
        HelperSpec::Vm { home, options } => {
            options.check()?;
            crate::vm::run_in_process(&Home::resolve(Some(home)), &options, false)
        }
        HelperSpec::VmRestore { home, options } => {
            crate::vm_snapshot::restore_in_process(&Home::resolve(Some(home)), &options, false)
        }
        HelperSpec::DnsProxy => Ok(kiln_network::proxy::serve(dir)?),
    }
}
