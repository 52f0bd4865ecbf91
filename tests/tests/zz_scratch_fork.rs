use kiln_tests::sandbox::{app_home, create, KillAll};
use std::time::Instant;

#[test]
fn scratch_resume() {
    let Some((tmp, k)) = app_home() else { return };
    let _guard = KillAll(k.clone());
    let id = create(&k, &["app"])["id"].as_str().unwrap().to_string();
    for i in 0..3 {
        k.ok(["sandbox", "pause", &id]);
        let t = Instant::now();
        let mut c = k.cmd(["sandbox", "resume", &id]);
        c.env("KILN_LOG", "debug");
        let out = c.output().unwrap();
        let r = t.elapsed();
        let t = Instant::now();
        k.ok(["sandbox", "exec", &id, "--", "true"]);
        eprintln!("resume {i}: {r:?} then exec {:?}", t.elapsed());
        std::fs::write(tmp.path().join(format!("resume{i}.log")), &out.stderr).unwrap();
    }
    eprintln!("logs in {}", tmp.path().display());
    std::mem::forget(tmp);
}
