//! The sandbox state machine ([`kiln_runtime::Sandboxes`]) over a fake driver: no runsc, no KVM, a
//! real store and real records in a temp home, each test in milliseconds.
//!
//! The fake keeps "processes" as a set of running sandbox ids and checkpoints as small blobs in
//! the store. A caller killed mid-operation is a panic inside a driver step (the sandbox's lock
//! goes with the unwinding, as with a dead process; the record keeps what was saved before), and
//! the next caller must reconcile the record through `Runtime::recover`, whose outcome each test
//! scripts.

use kiln_blockstore::{DirRemote, PutOptions, Store};
use kiln_imagebuilder::image::{ImageConfig, ImageRecord};
use kiln_runtime::{
    Access, Action, Adoption, Checkpoint, CreateSpec, Error, ForkSpec, OnTimeout, Op, OpKind,
    PendingNetwork, Phase, Recovered, Runtime, RuntimeKind, SandboxDir, SandboxRecord, Sandboxes,
    Source, State, StateKind,
};
use std::collections::{BTreeSet, HashMap};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A driver step the fake fails or dies in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Start,
    Checkpoint,
    Restore,
    Kill,
}

#[derive(Default)]
struct World {
    /// Sandboxes whose processes run.
    running: BTreeSet<String>,
    /// Steps that return an error the next time they run.
    fail: BTreeSet<Step>,
    /// Steps whose caller dies (panics) the next time they run.
    die: BTreeSet<Step>,
    /// What `recover` answers.
    recover: Option<Recovered>,
    /// Every call, in order (`step:id`).
    calls: Vec<String>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<World>>);

impl Fake {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the call; fails or dies if the test asked for it.
    fn step(&self, s: Step, dir: &SandboxDir) -> kiln_runtime::Result<()> {
        let mut w = self.world();
        w.calls.push(format!("{s:?}:{}", dir.id()).to_lowercase());
        if w.die.remove(&s) {
            drop(w);
            panic!("the caller dies in {s:?}");
        }
        if w.fail.remove(&s) {
            return Err(Error::Driver {
                what: format!("{s:?}"),
                detail: "fault injected by the test".into(),
            });
        }
        Ok(())
    }

    fn running(&self, id: &str) -> bool {
        self.world().running.contains(id)
    }

    fn calls(&self, step: &str) -> usize {
        self.world()
            .calls
            .iter()
            .filter(|c| c.starts_with(step))
            .count()
    }
}

/// The fake's whole state of a sandbox: the generation it runs.
fn driver_state(rec: &SandboxRecord) -> serde_json::Value {
    serde_json::json!({ "fake": rec.generation })
}

struct FakeDriver {
    fake: Fake,
    store: Store,
}

impl Runtime for FakeDriver {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Gvisor
    }

    fn available(&self) -> Result<(), String> {
        Ok(())
    }

    fn start(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        _image: &ImageRecord,
        net: &PendingNetwork,
    ) -> kiln_runtime::Result<()> {
        net.finish(rec)?;
        self.fake.step(Step::Start, dir)?;
        rec.driver = driver_state(rec);
        rec.agent = Some(dir.sub("agent.sock"));
        self.fake.world().running.insert(rec.id.clone());
        Ok(())
    }

    fn checkpoint(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        stop: bool,
    ) -> kiln_runtime::Result<Checkpoint> {
        dir.enter(rec, Phase::Checkpoint)?;
        self.fake.step(Step::Checkpoint, dir)?;
        let memory = format!("memory of {} at generation {}", rec.id, rec.generation);
        let blob = self
            .store
            .put_bytes(memory.as_bytes(), &PutOptions::default())?;
        let cp = Checkpoint {
            state: rec.driver.clone(),
            blobs: vec![blob],
        };
        if stop {
            self.fake.world().running.remove(&rec.id);
        }
        if let Some(op) = rec.op.as_mut() {
            op.checkpoint = Some(cp.clone());
        }
        dir.enter(rec, Phase::Saved)?;
        Ok(cp)
    }

    fn restore(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        checkpoint: &Checkpoint,
        _image: &ImageRecord,
        net: &PendingNetwork,
    ) -> kiln_runtime::Result<()> {
        net.finish(rec)?;
        self.fake.step(Step::Restore, dir)?;
        assert!(checkpoint.state["fake"].is_u64(), "{checkpoint:?}");
        rec.driver = driver_state(rec);
        rec.agent = Some(dir.sub("agent.sock"));
        self.fake.world().running.insert(rec.id.clone());
        Ok(())
    }

    fn kill(&self, dir: &SandboxDir, rec: &SandboxRecord) -> kiln_runtime::Result<()> {
        self.fake.step(Step::Kill, dir)?;
        self.fake.world().running.remove(&rec.id);
        Ok(())
    }

    fn exited(&self, _dir: &SandboxDir, rec: &SandboxRecord) -> Option<String> {
        (!self.fake.running(&rec.id)).then(|| "fake processes gone".to_string())
    }

    fn connect(&self, _dir: &SandboxDir, rec: &SandboxRecord) -> kiln_runtime::Result<UnixStream> {
        if !self.fake.running(&rec.id) {
            return Err(Error::Driver {
                what: "connect".into(),
                detail: "not running".into(),
            });
        }
        Ok(UnixStream::pair().expect("socketpair").0)
    }

    fn recover(
        &self,
        dir: &SandboxDir,
        rec: &mut SandboxRecord,
        op: &Op,
    ) -> kiln_runtime::Result<Recovered> {
        self.fake
            .world()
            .calls
            .push(format!("recover:{}:{}", dir.id(), op.kind.name()));
        let outcome = self
            .fake
            .world()
            .recover
            .take()
            .expect("test scripts recover");
        match &outcome {
            Recovered::Running => {
                self.fake.world().running.insert(rec.id.clone());
            }
            Recovered::Stopped | Recovered::Lost(_) | Recovered::Checkpointed(_) => {
                self.fake.world().running.remove(&rec.id);
            }
            Recovered::Pending => {}
        }
        Ok(outcome)
    }
}

struct Rig {
    _home: tempfile::TempDir,
    home: PathBuf,
    fake: Fake,
    sb: Sandboxes,
}

impl Rig {
    fn new() -> Rig {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().to_path_buf();
        let store = Store::open(&path.join("store")).unwrap();
        let disk = store
            .put_bytes(&[7u8; 4096], &PutOptions::default())
            .unwrap();
        let image = ImageRecord {
            schema: 1,
            disk,
            disk_size: 4096,
            layers: Vec::new(),
            config: ImageConfig {
                env: vec!["PATH=/bin".into()],
                cmd: Some(vec!["/bin/sh".into()]),
                ..ImageConfig::default()
            },
            parent: None,
            source: "test".into(),
            history: Vec::new(),
        };
        let id = kiln_imagebuilder::image::put_record(&store, &image).unwrap();
        kiln_imagebuilder::image::tag(&store, "img", &id).unwrap();
        let fake = Fake::default();
        let driver = FakeDriver {
            fake: fake.clone(),
            store: store.clone(),
        };
        let sb = Sandboxes::new(&path, store, vec![Box::new(driver)]);
        Rig {
            _home: home,
            home: path,
            fake,
            sb,
        }
    }

    fn spec(&self) -> CreateSpec {
        let mut s = CreateSpec::new(Source::Image("img".into()));
        s.no_network = true;
        s
    }

    fn create(&self) -> SandboxRecord {
        self.sb.create(self.spec()).unwrap()
    }

    fn dir(&self, id: &str) -> SandboxDir {
        SandboxDir::new(self.home.join("sandboxes").join(id))
    }

    /// Runs `f` as a caller that dies in the step the fake was told to die in.
    fn dies<T>(&self, f: impl FnOnce() -> T) {
        let r = catch_unwind(AssertUnwindSafe(f));
        assert!(r.is_err(), "the caller was to die");
    }

    /// The record on disk, as the dead caller left it (not reconciled).
    fn on_disk(&self, id: &str) -> SandboxRecord {
        self.dir(id).load().unwrap()
    }

    /// Another home (as on another host), its store on one remote with this home's (a
    /// directory, `remote`), with its fake.
    fn other_home(&self) -> (tempfile::TempDir, Fake, Sandboxes) {
        let home = tempfile::tempdir().unwrap();
        let remote = home.path().join("remote");
        let dir_remote = || std::sync::Arc::new(DirRemote::new(&remote).unwrap());
        self.sb.store().set_remote(dir_remote());
        let store = Store::open(&home.path().join("store")).unwrap();
        store.set_remote(dir_remote());
        let fake = Fake::default();
        let driver = FakeDriver {
            fake: fake.clone(),
            store: store.clone(),
        };
        let sb = Sandboxes::new(home.path(), store, vec![Box::new(driver)]);
        (home, fake, sb)
    }

    /// Pauses `id` and pushes its snapshot (with its image) to the remote.
    fn pause_and_push(&self, id: &str) -> SandboxRecord {
        let paused = self.sb.pause(id).unwrap();
        let State::Paused { saved } = &paused.state else {
            panic!("{id} did not pause")
        };
        kiln_runtime::sandbox_snapshot::push(self.sb.store(), saved, None).unwrap();
        paused
    }

    fn sandbox_dirs(&self) -> usize {
        std::fs::read_dir(self.home.join("sandboxes"))
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    }
}

fn wrong_state(e: Error) -> (StateKind, Action) {
    match e {
        Error::WrongState { state, action, .. } => (state, action),
        e => panic!("expected a wrong-state error, got {e}"),
    }
}

#[test]
fn create_runs_with_the_image_defaults() {
    let r = Rig::new();
    let mut spec = r.spec();
    spec.name = Some("one".into());
    spec.env.insert("A".into(), "1".into());
    let rec = r.sb.create(spec).unwrap();
    assert_eq!(rec.state, State::Running);
    assert_eq!(rec.generation, 0);
    assert_eq!(rec.defaults.cmd, ["/bin/sh"]);
    assert_eq!(rec.env["A"], "1");
    assert!(rec.op.is_none() && rec.deadline_ms.is_none());
    assert!(r.fake.running(&rec.id));
    assert_eq!(r.sb.get("one").unwrap().id, rec.id, "found by name");
    assert_eq!(r.sb.list().unwrap().len(), 1);
    let mut again = r.spec();
    again.name = Some("one".into());
    assert!(matches!(r.sb.create(again), Err(Error::NameTaken(_))));
    assert!(r.sb.connect(&rec.id).is_ok());
}

#[test]
fn create_failing_leaves_nothing() {
    let r = Rig::new();
    r.fake.world().fail.insert(Step::Start);
    let mut spec = r.spec();
    spec.name = Some("n".into());
    assert!(matches!(
        r.sb.create(spec.clone()),
        Err(Error::Driver { .. })
    ));
    assert_eq!(r.sb_dirs_and_list(), (0, 0));
    // The name is free again.
    r.sb.create(spec).unwrap();
    // A bad request is refused before anything runs.
    let mut big = r.spec();
    big.disk_mib = Some(0);
    assert!(matches!(r.sb.create(big), Err(Error::Invalid(_))));
    let mut gone = r.spec();
    gone.source = Source::Image("nope".into());
    assert!(r.sb.create(gone).is_err());
    assert_eq!(r.fake.calls("start"), 2);
}

impl Rig {
    fn sb_dirs_and_list(&self) -> (usize, usize) {
        (self.sandbox_dirs(), self.sb.list().unwrap().len())
    }
}

#[test]
fn pause_and_resume() {
    let r = Rig::new();
    let rec = r.create();
    let paused = r.sb.pause(&rec.id).unwrap();
    let State::Paused { saved } = paused.state else {
        panic!("{:?}", paused.state)
    };
    assert!(paused.op.is_none() && paused.agent.is_none());
    assert!(!r.fake.running(&rec.id));
    assert_eq!(r.sb.get(&rec.id).unwrap().state, State::Paused { saved });

    // Wrong states: a paused sandbox cannot be paused, snapshotted, forked or connected to.
    let (state, _) = wrong_state(r.sb.pause(&rec.id).unwrap_err());
    assert_eq!(state, StateKind::Paused);
    wrong_state(r.sb.snapshot(&rec.id, None).unwrap_err());
    // A paused sandbox's policy may change for its resume, but not "at once".
    let policy = kiln_runtime::NetworkPolicy::default();
    let (state, action) = wrong_state(r.sb.set_running_network(&rec.id, policy).unwrap_err());
    assert_eq!((state, action), (StateKind::Paused, Action::ChangeNetwork));
    wrong_state(
        r.sb.fork(
            &rec.id,
            ForkSpec {
                count: 1,
                timeout_secs: None,
            },
        )
        .unwrap_err(),
    );
    wrong_state(r.sb.connect(&rec.id).unwrap_err());

    let resumed = r.sb.resume(&rec.id, Some(60)).unwrap();
    assert_eq!(resumed.state, State::Running);
    assert_eq!(resumed.generation, 1, "a restore is the next generation");
    assert_eq!(resumed.timeout_secs, Some(60));
    assert!(resumed.deadline_ms.is_some());
    assert!(r.fake.running(&rec.id));
    let e = r.sb.resume(&rec.id, None).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("is running: only a paused sandbox can be resumed"),
        "{e}"
    );
    assert_eq!(wrong_state(e), (StateKind::Running, Action::Resume));
}

#[test]
fn failed_steps_leave_the_sandbox_as_it_was() {
    let r = Rig::new();
    let rec = r.create();
    // A checkpoint that fails while the processes run: still running, nothing held.
    r.fake.world().fail.insert(Step::Checkpoint);
    assert!(r.sb.pause(&rec.id).is_err());
    let now = r.sb.get(&rec.id).unwrap();
    assert_eq!((now.state, now.op), (State::Running, None));
    // A resume whose restore fails: paused as before.
    let paused = r.sb.pause(&rec.id).unwrap();
    r.fake.world().fail.insert(Step::Restore);
    assert!(r.sb.resume(&rec.id, None).is_err());
    let now = r.sb.get(&rec.id).unwrap();
    assert_eq!((&now.state, &now.op), (&paused.state, &None));
    assert_eq!(r.sb.resume(&rec.id, None).unwrap().state, State::Running);
}

#[test]
fn snapshot_and_fork() {
    let r = Rig::new();
    let rec = r.create();
    let snap = r.sb.snapshot(&rec.id, Some("snap1")).unwrap();
    assert_eq!(r.sb.get(&rec.id).unwrap().state, State::Running);
    assert!(r.fake.running(&rec.id), "a live snapshot keeps it running");

    // A sandbox from the named snapshot.
    let mut spec = r.spec();
    spec.source = Source::Snapshot("snap1".into());
    let child = r.sb.create(spec).unwrap();
    assert_eq!(child.snapshot, Some(snap));
    assert_eq!(child.generation, 1);

    let forks =
        r.sb.fork(
            &rec.id,
            ForkSpec {
                count: 3,
                timeout_secs: Some(30),
            },
        )
        .unwrap();
    assert_eq!(forks.len(), 3);
    for f in &forks {
        assert_eq!(f.state, State::Running);
        assert_eq!(f.generation, 1);
        assert!(f.deadline_ms.is_some());
        assert!(r.fake.running(&f.id));
    }
    assert_eq!(r.sb.list().unwrap().len(), 5);
    assert!(matches!(
        r.sb.fork(
            &rec.id,
            ForkSpec {
                count: 0,
                timeout_secs: None
            }
        ),
        Err(Error::Invalid(_))
    ));

    // All or nothing: one fork failing undoes the others.
    r.fake.world().fail.insert(Step::Restore);
    assert!(r
        .sb
        .fork(
            &rec.id,
            ForkSpec {
                count: 2,
                timeout_secs: None
            }
        )
        .is_err());
    assert_eq!(r.sb.list().unwrap().len(), 5);

    assert!(r.sb.remove_snapshot("snap1").unwrap());
    assert!(!r.sb.remove_snapshot("snap1").unwrap());
}

#[test]
fn kill_removes_everything() {
    let r = Rig::new();
    let rec = r.create();
    let paused = r.create();
    r.sb.pause(&paused.id).unwrap();
    for id in [&rec.id, &paused.id] {
        r.sb.kill(id).unwrap();
        assert!(matches!(r.sb.get(id), Err(Error::NotFound(_))));
        assert!(matches!(r.sb.kill(id), Err(Error::NotFound(_))));
    }
    assert!(!r.fake.running(&rec.id));
    assert_eq!(r.sb_dirs_and_list(), (0, 0));
}

#[test]
fn timeouts_kill_or_pause() {
    let r = Rig::new();
    let killed = r.create();
    let mut spec = r.spec();
    spec.on_timeout = OnTimeout::Pause;
    let paused = r.sb.create(spec).unwrap();
    let kept = r.create();
    r.sb.set_timeout(&kept.id, Some(3600)).unwrap();
    for id in [&killed.id, &paused.id] {
        // Due now.
        r.sb.set_timeout(id, Some(0)).unwrap();
    }
    assert!(matches!(r.sb.get(&killed.id), Err(Error::NotFound(_))));
    assert!(!r.fake.running(&killed.id));
    assert!(matches!(
        r.sb.get(&paused.id).unwrap().state,
        State::Paused { .. }
    ));
    assert_eq!(r.sb.get(&kept.id).unwrap().state, State::Running);

    // Extending never shortens; a sandbox without a deadline keeps none.
    let before = r.sb.get(&kept.id).unwrap().deadline_ms.unwrap();
    let after =
        r.sb.extend_timeout(&kept.id, 1)
            .unwrap()
            .deadline_ms
            .unwrap();
    assert_eq!(before, after);
    let other = r.create();
    assert_eq!(
        r.sb.extend_timeout(&other.id, 10).unwrap().deadline_ms,
        None
    );
    // Resuming starts the timeout again.
    let resumed = r.sb.resume(&paused.id, None).unwrap();
    assert_eq!(resumed.timeout_secs, Some(0));
    assert!(matches!(
        r.sb.get(&paused.id).unwrap().state,
        State::Paused { .. }
    ));
}

#[test]
fn a_timeout_pause_that_fails_ends_the_sandbox_failed() {
    let r = Rig::new();
    let mut spec = r.spec();
    spec.on_timeout = OnTimeout::Pause;
    let rec = r.sb.create(spec).unwrap();
    r.fake.world().fail.insert(Step::Checkpoint);
    r.sb.set_timeout(&rec.id, Some(0)).unwrap();
    // Past its deadline it does not run on: its processes end and it says why.
    let now = r.sb.get(&rec.id).unwrap();
    match &now.state {
        State::Failed { cause } => assert!(
            cause.starts_with("timed out and could not be paused"),
            "{cause}"
        ),
        s => panic!("expected failed, got {s:?}"),
    }
    assert!(!r.fake.running(&rec.id));
    assert!(now.op.is_none());
}

#[test]
fn a_sandbox_whose_processes_died_is_failed() {
    let r = Rig::new();
    let rec = r.create();
    r.fake.world().running.remove(&rec.id);
    let now = r.sb.get(&rec.id).unwrap();
    let State::Failed { cause } = now.state else {
        panic!("{:?}", now.state)
    };
    assert!(cause.starts_with("fake processes gone"), "{cause}");
    wrong_state(r.sb.pause(&rec.id).unwrap_err());
    r.sb.kill(&rec.id).unwrap();
}

#[test]
fn a_creator_killed_mid_way_leaves_nothing() {
    let r = Rig::new();
    r.fake.world().die.insert(Step::Start);
    let mut spec = r.spec();
    spec.name = Some("half".into());
    r.dies(|| r.sb.create(spec.clone()));
    assert_eq!(r.sandbox_dirs(), 1, "a `starting` record is left");
    assert_eq!(
        r.sb.list().unwrap().len(),
        0,
        "and the next caller removes it"
    );
    assert_eq!(r.sandbox_dirs(), 0);
    assert_eq!(r.fake.calls("kill"), 1);
    r.sb.create(spec).unwrap();
}

#[test]
fn a_kill_cut_short_is_finished() {
    let r = Rig::new();
    let rec = r.create();
    r.fake.world().die.insert(Step::Kill);
    r.dies(|| r.sb.kill(&rec.id));
    assert_eq!(r.on_disk(&rec.id).op.map(|o| o.kind), Some(OpKind::Kill));
    assert!(matches!(r.sb.get(&rec.id), Err(Error::NotFound(_))));
    assert_eq!(r.fake.calls("kill"), 2);
    assert!(!r.fake.running(&rec.id));
}

#[test]
fn a_pause_killed_in_its_checkpoint_is_completed_or_rolled_back() {
    // The driver's checkpoint completed: the pause completes.
    let r = Rig::new();
    let rec = r.create();
    r.fake.world().die.insert(Step::Checkpoint);
    r.dies(|| r.sb.pause(&rec.id));
    let op = r.on_disk(&rec.id).op.unwrap();
    assert_eq!((op.kind, op.phase), (OpKind::Pause, Phase::Checkpoint));
    let blob =
        r.sb.store()
            .put_bytes(b"late", &PutOptions::default())
            .unwrap();
    r.fake.world().recover = Some(Recovered::Checkpointed(Checkpoint {
        state: serde_json::json!({ "fake": 0 }),
        blobs: vec![blob],
    }));
    let now = r.sb.get(&rec.id).unwrap();
    assert!(matches!(now.state, State::Paused { .. }), "{:?}", now.state);
    assert!(now.op.is_none());
    assert_eq!(r.fake.calls("recover"), 1);
    assert_eq!(r.sb.resume(&rec.id, None).unwrap().state, State::Running);

    // The driver undid it: running as before.
    r.fake.world().die.insert(Step::Checkpoint);
    r.dies(|| r.sb.pause(&rec.id));
    r.fake.world().recover = Some(Recovered::Running);
    let now = r.sb.get(&rec.id).unwrap();
    assert_eq!((now.state, now.op), (State::Running, None));
}

#[test]
fn a_pause_killed_after_its_snapshot_was_stored_only_finishes() {
    let r = Rig::new();
    let rec = r.create();
    // As a pause leaves its record once the snapshot is stored (`op.saved`).
    let saved = r.sb.snapshot(&rec.id, Some("s")).unwrap();
    let mut on_disk = r.on_disk(&rec.id);
    let mut op = Op::new(OpKind::Pause, Phase::Saved);
    op.saved = Some(saved);
    on_disk.op = Some(op);
    r.dir(&rec.id).save(&on_disk).unwrap();
    let now = r.sb.get(&rec.id).unwrap();
    assert_eq!(now.state, State::Paused { saved });
    assert_eq!(r.fake.calls("recover"), 0, "nothing left for the driver");
}

#[test]
fn a_snapshot_or_fork_killed_mid_way_is_reconciled() {
    for kind in ["snapshot", "fork"] {
        let r = Rig::new();
        let rec = r.create();
        r.fake.world().die.insert(Step::Checkpoint);
        r.dies(|| match kind {
            "snapshot" => r.sb.snapshot(&rec.id, None).map(|_| ()),
            _ => {
                r.sb.fork(
                    &rec.id,
                    ForkSpec {
                        count: 1,
                        timeout_secs: None,
                    },
                )
                .map(|_| ())
            }
        });
        assert_eq!(r.on_disk(&rec.id).op.unwrap().kind.name(), kind);
        // A step that still runs on its own: the record keeps the operation, and other
        // operations wait for it.
        r.fake.world().recover = Some(Recovered::Pending);
        assert!(r.sb.get(&rec.id).unwrap().op.is_some());
        r.fake.world().recover = Some(Recovered::Pending);
        assert!(matches!(r.sb.pause(&rec.id), Err(Error::Busy(_))));
        // The processes were lost meanwhile: failed, with the interrupted operation named.
        r.fake.world().recover = Some(Recovered::Lost("the runtime died".into()));
        let now = r.sb.get(&rec.id).unwrap();
        let State::Failed { cause } = now.state else {
            panic!("{:?}", now.state)
        };
        assert!(
            cause.starts_with(&format!("the runtime died (a {kind} was interrupted)")),
            "{cause}"
        );
        assert!(now.op.is_none());
        assert_eq!(r.sb.list().unwrap().len(), 1, "no fork was made");
    }
}

#[test]
fn a_resume_killed_in_its_restore_is_undone() {
    let r = Rig::new();
    let rec = r.create();
    let paused = r.sb.pause(&rec.id).unwrap();
    r.fake.world().die.insert(Step::Restore);
    r.dies(|| r.sb.resume(&rec.id, None));
    let op = r.on_disk(&rec.id).op.unwrap();
    assert_eq!((op.kind, op.phase), (OpKind::Resume, Phase::Restore));
    r.fake.world().recover = Some(Recovered::Stopped);
    let now = r.sb.get(&rec.id).unwrap();
    assert_eq!(
        (&now.state, &now.op, &now.agent),
        (&paused.state, &None, &None)
    );
    assert_eq!(r.sb.resume(&rec.id, None).unwrap().state, State::Running);
}

#[test]
fn operations_on_unknown_sandboxes() {
    let r = Rig::new();
    for e in [
        r.sb.pause("nope").unwrap_err(),
        r.sb.resume("nope", None).unwrap_err(),
        r.sb.kill("nope").unwrap_err(),
        r.sb.get("../x").unwrap_err(),
        r.sb.snapshot("nope", None).unwrap_err(),
    ] {
        assert!(matches!(e, Error::NotFound(_)), "{e}");
    }
    let calls: HashMap<&str, usize> = ["start", "kill", "checkpoint"]
        .iter()
        .map(|s| (*s, r.fake.calls(s)))
        .collect();
    assert!(calls.values().all(|n| *n == 0), "{calls:?}");
}

/// What another home needs to adopt paused sandbox `rec`.
fn adoption(rec: &SandboxRecord) -> Adoption {
    let State::Paused { saved } = rec.state else {
        panic!("{} is not paused", rec.id)
    };
    Adoption {
        id: rec.id.clone(),
        snapshot: saved,
        name: rec.name.clone(),
        source: rec.source.clone(),
        created_ms: rec.created_ms,
        deadline_ms: rec.deadline_ms,
        timeout_secs: Some(60),
        on_timeout: OnTimeout::Pause,
        auto_resume: true,
        metadata: [("k".to_string(), "v".to_string())].into(),
        access: Access::new(true, false),
    }
}

#[test]
fn a_paused_sandbox_is_adopted_by_another_home_and_resumed_there() {
    let r = Rig::new();
    let rec = r.create();
    let (_home, fake, b) = r.other_home();
    let paused = r.pause_and_push(&rec.id);
    let a = adoption(&paused);
    let got = b.adopt(a.clone(), || Ok(true)).unwrap().expect("claimed");
    assert_eq!(got.state, paused.state);
    assert!(got.op.is_none());
    assert_eq!(
        (got.id.as_str(), got.generation, got.cpus, got.image),
        (
            rec.id.as_str(),
            paused.generation,
            paused.cpus,
            paused.image
        )
    );
    assert_eq!((got.access, got.auto_resume), (a.access, true));
    assert_eq!(
        b.get(&rec.id).unwrap().state,
        paused.state,
        "durable, as listed"
    );
    let resumed = b.resume(&rec.id, None).unwrap();
    assert_eq!(resumed.state, State::Running);
    assert_eq!(resumed.generation, paused.generation + 1);
    assert!(fake.running(&rec.id));
    // The first home drops its copy: a paused sandbox holds nothing on the host, so its kill
    // leaves the driver alone (the host's names are the sandbox's, which runs elsewhere).
    r.sb.kill(&rec.id).unwrap();
    assert_eq!(r.fake.calls("kill"), 0);
    assert!(fake.running(&rec.id));
    // Adopting a sandbox this home has is refused.
    assert!(matches!(
        b.adopt(adoption(&paused), || Ok(true)),
        Err(Error::Adopt { .. })
    ));
}

#[test]
fn an_adoption_refused_or_cut_short() {
    let r = Rig::new();
    let rec = r.create();
    let (home, _fake, b) = r.other_home();
    let paused = r.pause_and_push(&rec.id);
    let dirs = || {
        std::fs::read_dir(home.path().join("sandboxes"))
            .unwrap()
            .count()
    };
    // Not claimed (another host took it), or the claim failed: nothing is left.
    assert!(b.adopt(adoption(&paused), || Ok(false)).unwrap().is_none());
    match b.adopt(adoption(&paused), || Err("etcd is away".into())) {
        Err(e @ Error::Adopt { .. }) => assert!(e.to_string().contains("etcd is away"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(b.get(&rec.id), Err(Error::NotFound(_))));
    // The remote out of reach once the claim is made: the adoption's error, and the record
    // says how far it got; the next command says why while the remote is away, and
    // finishes the adoption once it is back.
    let remote = home.path().join("remote");
    let away = home.path().join("remote-away");
    let cut = || std::fs::rename(&remote, &away).unwrap();
    assert!(matches!(
        b.adopt(adoption(&paused), || {
            cut();
            Ok(true)
        }),
        Err(Error::Store(_))
    ));
    let dir = SandboxDir::new(home.path().join("sandboxes").join(&rec.id));
    let left = dir.load().unwrap();
    assert_eq!(
        left.op.map(|o| (o.kind, o.phase)),
        Some((OpKind::Adopt, Phase::Store))
    );
    assert!(matches!(b.resume(&rec.id, None), Err(Error::Store(_))));
    std::fs::rename(&away, &remote).unwrap();
    let listed = b.list().unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].op.is_none() && listed[0].state == paused.state);
    // The caller dies as it claims: the record says so, and the next command finishes it
    // (whether the claim was made is the claimer's to settle: a cluster stops the copy
    // whose catalog entry names another node).
    b.kill(&rec.id).unwrap();
    r.dies(|| b.adopt(adoption(&paused), || panic!("the caller dies in its claim")));
    assert_eq!(
        dir.load().unwrap().op.map(|o| (o.kind, o.phase)),
        Some((OpKind::Adopt, Phase::Prepare))
    );
    assert_eq!(b.resume(&rec.id, None).unwrap().state, State::Running);
    assert_eq!(dirs(), 2, "the sandbox and the holds' lock");
}
