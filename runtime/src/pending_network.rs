//! A sandbox's network made on a thread of its own while its runtime prepares the rest (its
//! root file system, disk, cgroups, a checkpoint's files): the ~60-90 ms of namespaces, links,
//! rules and DNS proxy no longer come before all of that. The runtime waits for it just
//! before it starts the sandbox's processes; the caller always waits for it too, so nothing is
//! still being made when a failed start is cleaned up (by sandbox id, as after a crash).

use crate::{Error, Result, SandboxRecord};
use kiln_network::Attachment;
use std::sync::Mutex;
use std::thread::JoinHandle;

enum Slot {
    /// The sandbox has no network.
    None,
    Making(JoinHandle<std::result::Result<Attachment, kiln_network::Error>>),
    Made(Attachment),
    /// Its error was returned to the first waiter.
    Failed,
}

/// A network being made for a sandbox, or none.
pub struct PendingNetwork(Mutex<Slot>);

impl PendingNetwork {
    /// For a sandbox without a network, or whose network is in its record already.
    pub fn none() -> PendingNetwork {
        PendingNetwork(Mutex::new(Slot::None))
    }

    /// Starts making the network: `make` runs on a thread of its own.
    pub(crate) fn spawn(
        make: impl FnOnce() -> std::result::Result<Attachment, kiln_network::Error> + Send + 'static,
    ) -> PendingNetwork {
        PendingNetwork(Mutex::new(Slot::Making(std::thread::spawn(make))))
    }

    /// Whether the sandbox gets a network from this (made or being made).
    pub fn coming(&self) -> bool {
        !matches!(*self.lock(), Slot::None)
    }

    /// Waits for the network: its attachment, or None when there is none. Later calls
    /// answer at once (a failure is reported in full once).
    pub fn wait(&self) -> Result<Option<Attachment>> {
        let mut slot = self.lock();
        if let Slot::Making(_) = &*slot {
            let Slot::Making(h) = std::mem::replace(&mut *slot, Slot::Failed) else {
                unreachable!("matched above");
            };
            *slot = match h.join() {
                Ok(Ok(att)) => Slot::Made(att),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(Error::Driver {
                        what: "making the sandbox's network".into(),
                        detail: "its thread panicked".into(),
                    })
                }
            };
        }
        match &*slot {
            Slot::None => Ok(None),
            Slot::Made(att) => Ok(Some(att.clone())),
            Slot::Failed => Err(Error::Invalid(
                "the sandbox's network could not be made (see the first error)".into(),
            )),
            Slot::Making(_) => unreachable!("joined above"),
        }
    }

    /// [`Self::wait`], and the attachment into `rec.net`.
    pub fn finish(&self, rec: &mut SandboxRecord) -> Result<()> {
        if let Some(att) = self.wait()? {
            rec.net = Some(att);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_reported_in_full_once_then_still_an_error() {
        let p = PendingNetwork::spawn(|| Err(kiln_network::Error::Invalid("no slot".into())));
        assert!(p.coming());
        let first = p.wait().unwrap_err().to_string();
        assert!(first.contains("no slot"), "{first}");
        assert!(p.wait().is_err());
        assert!(!PendingNetwork::none().coming());
        assert!(PendingNetwork::none().wait().unwrap().is_none());
    }
}
