//! kiln-cluster against a real 3-member etcd (tests/src/etcd.rs): compare-and-swap conflicts
//! are seen, a node whose lease runs out leaves the cluster (and joins again on its next
//! renewal), its running sandboxes can be marked lost only while it is out, its paused ones
//! taken over only then and only once (or, released by a drain, while it lives, once), a
//! drain's key marks its node for placement, and a killed member is survived.

use kiln_cluster::membership::{self, Membership};
use kiln_cluster::placement::{self, Need};
use kiln_cluster::{
    drain, Catalog, Etcd, NodeInfo, Pushed, SandboxEntry, SandboxState, TemplateEntry,
    TemplateKind, Templates,
};
use std::sync::Arc;
use std::time::Duration;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn entry(node: &str, state: SandboxState) -> SandboxEntry {
    SandboxEntry {
        node: node.into(),
        state,
        template: "base".into(),
        alias: None,
        metadata: [("k".to_string(), "v".to_string())].into(),
        started_ms: 1,
        end_ms: Some(2),
        cpus: 1,
        memory_mib: 512,
        disk_mib: 1024,
        cause: None,
        pushed: None,
        released: false,
    }
}

#[test]
fn catalog_compare_and_swap() {
    let Some(cluster) = kiln_tests::etcd::Etcd::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let etcd = Arc::new(Etcd::new(&cluster.urls()).unwrap());
        let cat = Catalog::new(etcd);
        let r1 = cat
            .create("sb1", &entry("a", SandboxState::Running))
            .await
            .unwrap()
            .unwrap();
        // A second create of the same id is refused.
        assert_eq!(
            cat.create("sb1", &entry("b", SandboxState::Running))
                .await
                .unwrap(),
            None
        );
        let r2 = cat
            .update("sb1", &entry("a", SandboxState::Paused), r1)
            .await
            .unwrap()
            .expect("update at the current revision");
        assert!(r2 > r1);
        // A writer still at r1 lost the race: nothing written.
        assert_eq!(
            cat.update("sb1", &entry("b", SandboxState::Running), r1)
                .await
                .unwrap(),
            None
        );
        assert!(!cat.remove("sb1", r1).await.unwrap());
        let (e, rev) = cat.get("sb1").await.unwrap().unwrap();
        assert_eq!((e, rev), (entry("a", SandboxState::Paused), r2));
        cat.create("sb2", &entry("b", SandboxState::Running))
            .await
            .unwrap()
            .unwrap();
        let ids: Vec<String> = cat
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|(id, ..)| id)
            .collect();
        assert_eq!(ids, ["sb1", "sb2"]);
        assert!(cat.remove("sb1", r2).await.unwrap());
        assert_eq!(cat.get("sb1").await.unwrap(), None);
    });
}

#[test]
fn template_names_move_by_compare_and_swap() {
    let Some(cluster) = kiln_tests::etcd::Etcd::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let etcd = Arc::new(Etcd::new(&cluster.urls()).unwrap());
        let t = Templates::new(etcd);
        let hex = |n: u64| format!("{n:064x}");
        let image =
            |id: &str, node: &str| TemplateEntry::new(TemplateKind::Image, id.into(), node, 8);
        // Eight publications of one name at once: each lands (retrying the lost swaps), the
        // last one wins, and the name points at one of them.
        let writes = (0..8).map(|i| {
            let t = t.clone();
            tokio::spawn(async move { t.publish("tpl", &image(&hex(i), "n1")).await })
        });
        for w in join_all(writes.collect()).await {
            w.unwrap();
        }
        let (e, _) = t.get("tpl").await.unwrap().unwrap();
        assert!((0..8).any(|i| e.id == hex(i)), "{e:?}");
        // Holders: added once, only to the id they pulled.
        t.add_holder("tpl", &e.id, "n2").await.unwrap();
        t.add_holder("tpl", &e.id, "n2").await.unwrap();
        t.add_holder("tpl", &hex(99), "n3").await.unwrap();
        let (held, _) = t.get("tpl").await.unwrap().unwrap();
        assert_eq!(held.holders, ["n1", "n2"]);
        // A removal of an id the name no longer points at leaves the newer one.
        t.publish("tpl", &image(&hex(100), "n2")).await.unwrap();
        assert!(!t.remove("tpl", Some(&e.id)).await.unwrap());
        assert_eq!(t.get("tpl").await.unwrap().unwrap().0.id, hex(100));
        assert!(t.remove("tpl", Some(&hex(100))).await.unwrap());
        assert!(t.get("tpl").await.unwrap().is_none());
        assert!(!t.remove("tpl", None).await.unwrap());
    });
}

/// Awaits every task.
async fn join_all<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn info(advertise: &str) -> NodeInfo {
    NodeInfo {
        advertise: advertise.into(),
        cpus: 2,
        memory_mib: 4096,
        free_memory_mib: 2048,
        max_sandboxes: 10,
        ..Default::default()
    }
}

#[test]
fn lease_expiry_removes_a_node() {
    let Some(cluster) = kiln_tests::etcd::Etcd::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let etcd = Arc::new(Etcd::new(&cluster.urls()).unwrap());
        let a = Membership::register(etcd.clone(), "a", info("http://a"), 2)
            .await
            .unwrap();
        let keep = a.spawn_keepalive();
        let b = Membership::register(etcd.clone(), "b", info("http://b"), 2)
            .await
            .unwrap();
        let ids = |v: Vec<(String, NodeInfo)>| v.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(membership::nodes(&etcd).await.unwrap()), ["a", "b"]);
        // The same id twice: refused once the first holder's lease has outlived the wait.
        let again = Membership::register(etcd.clone(), "a", info("http://x"), 2).await;
        assert!(
            matches!(again, Err(kiln_cluster::Error::NodeIdTaken(_))),
            "{:?}",
            again.err()
        );
        // b never renews: gone after its TTL; a renews and stays.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(ids(membership::nodes(&etcd).await.unwrap()), ["a"]);
        let mut i = info("http://a");
        i.sandboxes = 3;
        a.set_info(i);
        a.renew().await.unwrap();
        let got = membership::node(&etcd, "a").await.unwrap().unwrap();
        assert_eq!((got.advertise.as_str(), got.sandboxes), ("http://a", 3));
        // b's next renewal (etcd was away longer than the TTL, say) joins again.
        b.renew().await.unwrap();
        assert_eq!(ids(membership::nodes(&etcd).await.unwrap()), ["a", "b"]);
        keep.abort();
        a.leave().await.unwrap();
        b.leave().await.unwrap();
        assert!(membership::nodes(&etcd).await.unwrap().is_empty());
    });
}

#[test]
fn a_sandbox_is_marked_lost_only_while_its_node_is_out() {
    let Some(cluster) = kiln_tests::etcd::Etcd::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let etcd = Arc::new(Etcd::new(&cluster.urls()).unwrap());
        let cat = Catalog::new(etcd.clone());
        let a = Membership::register(etcd.clone(), "a", info("http://a"), 2)
            .await
            .unwrap();
        assert_eq!(a.joins(), 1);
        let running = entry("a", SandboxState::Running);
        let rev = cat.create("sb", &running).await.unwrap().unwrap();
        let lost = running.lost("node a is gone".into());
        assert_eq!(
            (lost.state, lost.cause.as_deref()),
            (SandboxState::Failed, Some("node a is gone"))
        );
        // a is live: the mark is refused, and so is a removal of its entry as lost.
        assert_eq!(cat.mark_lost("sb", &lost, rev).await.unwrap(), None);
        assert!(!cat.remove_lost("sb", "a", rev).await.unwrap());
        // a's lease runs out: the first mark wins, a second one at the old revision loses.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(membership::node(&etcd, "a").await.unwrap().is_none());
        let marked = cat.mark_lost("sb", &lost, rev).await.unwrap().unwrap();
        assert_eq!(cat.mark_lost("sb", &lost, rev).await.unwrap(), None);
        assert_eq!(
            cat.get("sb").await.unwrap().unwrap(),
            (lost.clone(), marked)
        );
        // a joins again on its next renewal, and can tell.
        a.renew().await.unwrap();
        assert_eq!(a.joins(), 2);
        // Tombstones leave after their end time (entry()'s end is 2 ms after the epoch).
        assert!(lost.expired(kiln_cluster::catalog::TOMBSTONE_GRACE_MS + 2));
        assert!(!lost.expired(kiln_cluster::catalog::TOMBSTONE_GRACE_MS + 1));
        assert!(!running.expired(u64::MAX));
        // A paused entry is taken over only once its node is out, by one of two nodes at once.
        let paused = pushed("a");
        let rev = cat.create("sb3", &paused).await.unwrap().unwrap();
        let to = |node: &str| SandboxEntry {
            node: node.into(),
            ..paused.clone()
        };
        assert_eq!(
            cat.take_over("sb3", &to("b"), rev, "a").await.unwrap(),
            None
        );
        a.leave().await.unwrap();
        let (b, c) = (to("b"), to("c"));
        let (rb, rc) = tokio::join!(
            cat.take_over("sb3", &b, rev, "a"),
            cat.take_over("sb3", &c, rev, "a")
        );
        let winner = match (rb.unwrap(), rc.unwrap()) {
            (Some(r), None) => (b, r),
            (None, Some(r)) => (c, r),
            other => panic!("two takeovers of one sandbox: {other:?}"),
        };
        assert_eq!(cat.get("sb3").await.unwrap().unwrap(), winner);
        // An entry of a node that is out can be removed as lost, once.
        let rev = cat.create("sb2", &running).await.unwrap().unwrap();
        assert!(cat.remove_lost("sb2", "a", rev).await.unwrap());
        assert_eq!(cat.get("sb2").await.unwrap(), None);
    });
}

fn pushed(node: &str) -> SandboxEntry {
    SandboxEntry {
        pushed: Some(Pushed {
            snapshot: "cd".repeat(32),
            timeout_secs: None,
            on_timeout: "kill".into(),
            auto_resume: false,
            access: Default::default(),
        }),
        ..entry(node, SandboxState::Paused)
    }
}

#[test]
fn a_drained_node_is_skipped_and_its_released_sandbox_taken_over_once() {
    let Some(cluster) = kiln_tests::etcd::Etcd::start_or_skip() else {
        return;
    };
    rt().block_on(async {
        let etcd = Arc::new(Etcd::new(&cluster.urls()).unwrap());
        let cat = Catalog::new(etcd.clone());
        let mut ms = Vec::new();
        for id in ["a", "b"] {
            ms.push(
                Membership::register(etcd.clone(), id, info(&format!("http://{id}")), 30)
                    .await
                    .unwrap(),
            );
        }
        let need = Need {
            cpus: 1,
            memory_mib: 512,
        };
        let chosen =
            |nodes: Vec<(String, NodeInfo)>| placement::choose(&nodes, need).map(str::to_string);
        assert_eq!(chosen(drain::nodes(&etcd).await.unwrap()), Some("a".into()));
        // A drain of a counts for placement from the moment it is asked (a has not seen it).
        let asked = drain::request(&etcd, "a").await.unwrap();
        let (seen, rev) = drain::requested(&etcd, "a").await.unwrap().unwrap();
        assert_eq!(seen, asked);
        assert!(
            !membership::node(&etcd, "a")
                .await
                .unwrap()
                .unwrap()
                .draining
        );
        assert_eq!(chosen(drain::nodes(&etcd).await.unwrap()), Some("b".into()));
        // The node's progress is a compare-and-swap on the key: a stale writer loses.
        let progress = drain::Drain {
            started_ms: Some(1),
            failed: [("x".to_string(), "no remote".to_string())].into(),
            ..asked.clone()
        };
        let rev2 = drain::update(&etcd, "a", &progress, rev)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            drain::update(&etcd, "a", &progress, rev).await.unwrap(),
            None
        );
        assert_eq!(
            drain::requested(&etcd, "a").await.unwrap(),
            Some((progress, rev2))
        );
        // Asked again: the failures are cleared, for the node to try them once more.
        assert!(drain::request(&etcd, "a").await.unwrap().failed.is_empty());

        // a, live, pushed its paused sandbox: no takeover as from a gone node...
        let rev = cat.create("sb", &pushed("a")).await.unwrap().unwrap();
        let to = |node: &str| SandboxEntry {
            node: node.into(),
            ..pushed("a")
        };
        assert_eq!(cat.take_over("sb", &to("b"), rev, "a").await.unwrap(), None);
        // ...but once a lets it go, one of two nodes taking it at once wins, a live.
        let released = SandboxEntry {
            released: true,
            ..pushed("a")
        };
        let rev = cat.update("sb", &released, rev).await.unwrap().unwrap();
        let (b, c) = (to("b"), to("c"));
        let (rb, rc) = tokio::join!(
            cat.take_over_released("sb", &b, rev),
            cat.take_over_released("sb", &c, rev)
        );
        let winner = match (rb.unwrap(), rc.unwrap()) {
            (Some(r), None) => (b, r),
            (None, Some(r)) => (c, r),
            other => panic!("two takeovers of one released sandbox: {other:?}"),
        };
        assert_eq!(cat.get("sb").await.unwrap().unwrap(), winner);
        assert!(!winner.0.released);
        // Entries and infos without the new fields (older nodes) read as not released, not
        // draining; a plain entry is written without it.
        let plain = serde_json::to_string(&pushed("a")).unwrap();
        assert!(!plain.contains("released"), "{plain}");
        let info: NodeInfo = serde_json::from_str(
            r#"{"advertise": "http://a", "cpus": 2,
            "memory_mib": 1, "free_memory_mib": 1, "sandboxes": 0, "sandbox_cpus": 0,
            "max_sandboxes": 1, "updated_ms": 0}"#,
        )
        .unwrap();
        assert!(!info.draining);
        // Undrained: a is a candidate again, at once.
        assert!(drain::cancel(&etcd, "a").await.unwrap());
        assert!(!drain::cancel(&etcd, "a").await.unwrap());
        assert_eq!(chosen(drain::nodes(&etcd).await.unwrap()), Some("a".into()));
        for m in ms {
            m.leave().await.unwrap();
        }
    });
}

#[test]
fn a_killed_member_is_survived() {
    let Some(mut cluster) = kiln_tests::etcd::Etcd::start_or_skip() else {
        return;
    };
    let rt = rt();
    let etcd = Arc::new(Etcd::new(&cluster.urls()).unwrap());
    let cat = Catalog::new(etcd.clone());
    let rev = rt
        .block_on(cat.create("sb", &entry("a", SandboxState::Running)))
        .unwrap()
        .unwrap();
    // The first endpoint (the one tried first) dies: calls go on through the others.
    cluster.kill(0);
    let rev = rt
        .block_on(cat.update("sb", &entry("a", SandboxState::Paused), rev))
        .unwrap()
        .expect("written through another member");
    assert_eq!(rt.block_on(cat.get("sb")).unwrap().unwrap().1, rev);
    cluster.restart(0);
    cluster.kill(1);
    cluster.kill(2);
    // No majority: a clear error, not a hang.
    let err = rt
        .block_on(cat.update("sb", &entry("a", SandboxState::Running), rev))
        .unwrap_err();
    assert!(matches!(err, kiln_cluster::Error::Unreachable(_)), "{err}");
    cluster.restart(1);
    // A majority again (members 0 and 1): the write goes through. The attempt without a
    // majority may have been committed after all (a leader that had not yet stepped down kept
    // it in its log): then the retry's comparison fails and the entry already says Running.
    let mut state = None;
    for _ in 0..50 {
        match rt.block_on(cat.update("sb", &entry("a", SandboxState::Running), rev)) {
            Ok(Some(_)) => {
                state = Some(SandboxState::Running);
                break;
            }
            Ok(None) => {
                state = rt.block_on(cat.get("sb")).unwrap().map(|(e, _)| e.state);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    assert_eq!(
        state,
        Some(SandboxState::Running),
        "no write after a majority came back"
    );
    // Every endpoint down: Unreachable names them.
    let dead = Etcd::new(&["http://127.0.0.1:1"]).unwrap();
    let err = rt.block_on(dead.get("x")).unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}
