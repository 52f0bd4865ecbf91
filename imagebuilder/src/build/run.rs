//! RUN steps: the command in the step jail ([`crate::step_jail`]) or a VM, with its
//! `--mount`s, and the step's key.

use super::*;

impl Builder<'_> {
    pub(super) fn run_step(
        &mut self,
        idx: usize,
        st: &mut StageState,
        ins: &Instruction,
        vars: &HashMap<String, String>,
        shell: &[String],
    ) -> Result<()> {
        let file = self.df.file.clone();
        for (k, _) in &ins.flags {
            if k != "network" && k != "mount" {
                return Err(derr(&file, ins, format!("RUN --{k} is not supported")));
            }
        }
        let mut mounts = Vec::new();
        let mut mount_key = Vec::new();
        for (_, v) in ins.flags.iter().filter(|(k, _)| k == "mount") {
            let v = dockerfile::expand_words(v, vars)
                .map_err(|e| derr(&file, ins, e))?
                .join("");
            let (m, k) = self
                .run_mount(idx, st, &v)
                .map_err(|e| derr(&file, ins, format!("RUN --mount={v}: {e}")))?;
            mounts.push(m);
            mount_key.extend_from_slice(&k);
        }
        let network = match ins.flags.iter().find(|(k, _)| k == "network") {
            Some((_, v)) if v == "none" => false,
            Some((_, v)) if v == "host" || v == "default" => true,
            Some((_, v)) => {
                return Err(derr(
                    &file,
                    ins,
                    format!("RUN --network={v}: use none|host|default"),
                ))
            }
            None => self.opts.network,
        };
        // The command and its stdin (a heredoc alone is the script; else it feeds stdin).
        let (argv, stdin) = match (&ins.args, ins.heredocs.first()) {
            (Args::Shell(s), Some(h)) => {
                let body = if h.expand {
                    dockerfile::expand_vars(&h.body, vars).map_err(|e| derr(&file, ins, e))?
                } else {
                    h.body.clone()
                };
                let rest = s.replace(&format!("<<{}", h.name), "");
                if rest.trim().is_empty() {
                    let mut v = shell.to_vec();
                    v.push(body);
                    (v, None)
                } else {
                    let mut v = shell.to_vec();
                    v.push(rest.trim().to_string());
                    (v, Some(body.into_bytes()))
                }
            }
            (Args::Shell(s), None) => {
                let mut v = shell.to_vec();
                v.push(s.clone());
                (v, None)
            }
            (Args::Exec(v), _) => (v.clone(), None),
        };
        let mut env = st.config.env.clone();
        let mut arg_keys: Vec<(&String, &String)> = st.args.iter().collect();
        arg_keys.sort();
        let mut arg_bytes = Vec::new();
        for (k, v) in arg_keys {
            if st.config.env_get(k).is_none() {
                env.push(format!("{k}={v}"));
            }
            arg_bytes.extend_from_slice(format!("{k}={v}\n").as_bytes());
        }
        if !env.iter().any(|kv| kv.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        let cfg = serde_json::to_vec(&(&env, &st.config.workdir, &st.config.user, network))
            .expect("serializes");
        let argv_bytes = serde_json::to_vec(&(&argv, &stdin)).expect("serializes");
        let key = chain(
            &st.key,
            &[b"RUN", &argv_bytes, &cfg, &arg_bytes, &mount_key],
        );
        if let Some(rec) = self.lookup_cache(&key)? {
            return self.cache_hit(idx, st, ins, key, rec);
        }
        self.say(&format!("  {}: {}", ins.line, ins.original));
        let root = self.fresh_upper(idx, st)?;
        let workdir = st.config.workdir.clone().unwrap_or_else(|| "/".into());
        mkdir_in_root(&root, &workdir)?;
        let spec = step_jail::RunSpec {
            rootfs: root.clone(),
            argv,
            env,
            workdir,
            user: st.config.user.clone(),
            network,
            stdin,
            memory_max: self.opts.memory_max,
            mounts,
        };
        let progress = &mut *self.progress;
        let on_line = &mut |line: &str| progress(&format!("    | {line}"));
        let outcome = match &self.vm_env {
            Some(vm) => crate::vm_isolation::run(&spec, vm, self.work.path(), on_line)?,
            None => step_jail::run(&spec, on_line)?,
        };
        if !outcome.success {
            return Err(Error::RunFailed {
                file,
                line: ins.line,
                cmd: ins.original.clone(),
                status: outcome.status,
                output: outcome.tail,
            });
        }
        let layer = self.upper_layer(st)?;
        self.record_step(idx, st, ins, key, layer.as_deref())
    }

    /// One `RUN --mount=...` spec: what to mount and what it adds to the step's key (a cache
    /// mount adds only its place: its content is a cache, not an input).
    pub(super) fn run_mount(
        &mut self,
        idx: usize,
        st: &StageState,
        spec: &str,
    ) -> std::result::Result<(step_jail::Mount, Vec<u8>), String> {
        let mut kind = "bind".to_string();
        let (mut target, mut source, mut from, mut id) = (None, None, None, None);
        let (mut rw, mut mode, mut uid, mut gid) = (false, None, None, None);
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, "true"));
            match k {
                "type" => kind = v.to_string(),
                "target" | "dst" | "destination" => target = Some(v.to_string()),
                "source" | "src" => source = Some(v.to_string()),
                "from" => from = Some(v.to_string()),
                "id" => id = Some(v.to_string()),
                "rw" | "readwrite" => rw = v != "false",
                "ro" | "readonly" => rw = v == "false",
                "mode" => mode = Some(u32::from_str_radix(v, 8).map_err(|_| format!("mode={v}"))?),
                "uid" => uid = Some(v.parse::<u32>().map_err(|_| format!("uid={v}"))?),
                "gid" => gid = Some(v.parse::<u32>().map_err(|_| format!("gid={v}"))?),
                "sharing" | "required" | "size" => {}
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        if !matches!(kind.as_str(), "bind" | "cache" | "tmpfs") {
            return Err(format!(
                "type={kind} is not supported (supported: bind, cache, tmpfs)"
            ));
        }
        let target = target.ok_or("needs target=PATH")?;
        // Relative targets are relative to the WORKDIR, as in BuildKit.
        let cwd = st.config.workdir.clone().unwrap_or_else(|| "/".into());
        let target = resolve_in(&cwd, &target);
        if target == "/" {
            return Err("cannot mount over /".into());
        }
        match kind.as_str() {
            "cache" => {
                let name = id.unwrap_or_else(|| target.clone());
                // Kept with the store (the kiln home), not in the temporary directory.
                let home = self.store.dir().parent().unwrap_or(self.tmp).to_path_buf();
                let dir = home
                    .join("build-cache")
                    .join(blake3::hash(name.as_bytes()).to_hex().as_str());
                if !dir.exists() {
                    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                    use std::os::unix::fs::PermissionsExt;
                    let perm = std::fs::Permissions::from_mode(mode.unwrap_or(0o755));
                    std::fs::set_permissions(&dir, perm).map_err(|e| e.to_string())?;
                    let c = CString::new(dir.as_os_str().as_encoded_bytes())
                        .map_err(|e| e.to_string())?;
                    // SAFETY: valid path; -1 keeps an id unchanged.
                    unsafe {
                        libc::chown(c.as_ptr(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))
                    };
                }
                let key = format!("cache:{name}:{target}\n").into_bytes();
                Ok((
                    step_jail::Mount {
                        source: Some(dir),
                        target,
                        readonly: false,
                    },
                    key,
                ))
            }
            "tmpfs" => Ok((
                step_jail::Mount {
                    source: None,
                    target: target.clone(),
                    readonly: false,
                },
                format!("tmpfs:{target}\n").into_bytes(),
            )),
            "bind" => {
                if rw {
                    return Err("rw bind mounts are not supported (writes would reach the \
                                build context or the other stage); copy the files instead"
                        .into());
                }
                let src = source.unwrap_or_else(|| ".".into());
                let rel = clean_rel(&src).ok_or("source leads outside its root")?;
                let (root, key_of_root) = match &from {
                    Some(f) => {
                        let s = self
                            .stage_index(f)
                            .filter(|&s| s < idx)
                            .ok_or_else(|| format!("from={f}: no earlier stage by that name"))?;
                        self.build_stage(s).map_err(|e| e.to_string())?;
                        let mut sst = self.stages[s].take().expect("built");
                        let r = self.materialize(s, &mut sst);
                        let k = sst.key;
                        self.stages[s] = Some(sst);
                        (r.map_err(|e| e.to_string())?, Some(k))
                    }
                    None => (self.opts.context.clone(), None),
                };
                let host = root.join(&rel);
                // No symlink may lead out of the context or stage root.
                let real = std::fs::canonicalize(&host).map_err(|e| format!("{src}: {e}"))?;
                let real_root = std::fs::canonicalize(&root).map_err(|e| e.to_string())?;
                if !real.starts_with(&real_root) {
                    return Err(format!("{src}: leads outside its root"));
                }
                let mut key = format!("bind:{target}:{src}:").into_bytes();
                match key_of_root {
                    Some(k) => key.extend_from_slice(k.as_bytes()),
                    None => key
                        .extend_from_slice(tree_hash(&real).map_err(|e| e.to_string())?.as_bytes()),
                }
                Ok((
                    step_jail::Mount {
                        source: Some(real),
                        target,
                        readonly: true,
                    },
                    key,
                ))
            }
            other => Err(format!(
                "type={other} is not supported (supported: bind, cache, tmpfs)"
            )),
        }
    }
}
