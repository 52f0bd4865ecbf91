//! COPY and ADD steps: sources from the build context, a stage or a URL, written as one
//! deterministic layer tar whose hash is the step's key.

use super::*;

/// What a COPY/ADD writes, after expansion.
#[derive(Clone, Copy)]
pub(super) struct CopySpec<'a> {
    srcs: &'a [String],
    heredocs: &'a [dockerfile::Heredoc],
    vars: &'a HashMap<String, String>,
    dest: &'a str,
    dest_is_dir: bool,
    owner: Option<(u32, u32)>,
    chmod: Option<u32>,
    /// ADD `--checksum` for a URL source.
    checksum: Option<&'a str>,
}

impl Builder<'_> {
    pub(super) fn copy_step(
        &mut self,
        idx: usize,
        st: &mut StageState,
        ins: &Instruction,
        vars: &HashMap<String, String>,
    ) -> Result<()> {
        let file = self.df.file.clone();
        let CopyFlags {
            from,
            chown,
            chmod,
            checksum,
        } = copy_flags(&file, ins, vars)?;
        let mut w = match &ins.args {
            Args::Exec(v) => v.clone(),
            Args::Shell(s) => dockerfile::expand_words(s, vars).map_err(|e| derr(&file, ins, e))?,
        };
        if w.len() < 2 {
            return Err(derr(
                &file,
                ins,
                format!("{} needs a source and a destination", ins.keyword),
            ));
        }
        let dest_raw = w.pop().expect("len >= 2");
        let cwd = st.config.workdir.clone().unwrap_or_else(|| "/".into());
        // `.`/`..` (e.g. `COPY f .` under a WORKDIR) name a directory, as a trailing `/` does.
        let last_component = dest_raw.rsplit('/').next().unwrap_or("");
        let dest_is_dir =
            dest_raw.ends_with('/') || matches!(last_component, "." | "..") || w.len() > 1;
        let dest = resolve_in(&cwd, &dest_raw);
        let owner = match &chown {
            None => None,
            Some(c) => Some(self.chown_owner(idx, st, c, ins)?),
        };
        // Where sources come from: the context, or an earlier stage (by its key).
        let from_stage = match &from {
            None => None,
            Some(f) => match self.stage_index(f).filter(|&s| s < idx) {
                Some(s) => {
                    self.build_stage(s)?;
                    Some((s, self.stages[s].as_ref().expect("built").key))
                }
                None => {
                    let why = format!("--from={f}: no earlier stage by that name");
                    return Err(derr(&file, ins, why));
                }
            },
        };
        let tar_path = self
            .work
            .path()
            .join(format!("copy-{idx}-{}.tar", ins.line));
        let spec = CopySpec {
            srcs: &w,
            heredocs: &ins.heredocs,
            vars,
            dest: &dest,
            dest_is_dir,
            owner,
            chmod,
            checksum: checksum.as_deref(),
        };
        let key = if let Some((s, sk)) = from_stage {
            // Keyed by the source stage's key: no need to read its files on a hit.
            let k = chain(
                &st.key,
                &[
                    b"COPY-FROM",
                    ins.original.as_bytes(),
                    sk.as_bytes(),
                    dest.as_bytes(),
                    format!("{owner:?}{chmod:?}").as_bytes(),
                ],
            );
            if let Some(rec) = self.lookup_cache(&k)? {
                return self.cache_hit(idx, st, ins, k, rec);
            }
            let sroot = self.stage_root(s)?;
            self.write_copy_tar(&sroot, false, &spec, &tar_path, ins)?;
            k
        } else {
            self.write_copy_tar(&self.opts.context, true, &spec, &tar_path, ins)?;
            let h = hash_file(&tar_path)?;
            let k = chain(&st.key, &[b"COPY", h.as_bytes()]);
            if let Some(rec) = self.lookup_cache(&k)? {
                return self.cache_hit(idx, st, ins, k, rec);
            }
            k
        };
        // `COPY file /dir` without a trailing slash copies into /dir when the image has that
        // directory. The parent key fixes the parent tree, so the key need not say which; on a
        // miss, look and write the tar again with the file inside the directory.
        if let Some((inside, src_root)) = self.single_file_into_dir(idx, st, &spec, from_stage)? {
            let spec = CopySpec {
                dest: &inside,
                dest_is_dir: false,
                ..spec
            };
            self.write_copy_tar(&src_root, from_stage.is_none(), &spec, &tar_path, ins)?;
        }
        self.say(&format!("  {}: {}", ins.line, ins.original));
        // Applied in a fresh upper directory: the step's tree, from which its disk is made.
        let root = self.fresh_upper(idx, st)?;
        let f = std::fs::File::open(&tar_path).ctx("open", &tar_path)?;
        layer::apply_layer(
            &root,
            f,
            &ApplyOptions {
                allow_devices: true,
            },
        )?;
        self.record_step(idx, st, ins, key, Some(&tar_path))
    }

    /// `COPY --chown=spec`'s owner, against the stage's /etc/passwd when given by name.
    fn chown_owner(
        &mut self,
        idx: usize,
        st: &mut StageState,
        spec: &str,
        ins: &Instruction,
    ) -> Result<(u32, u32)> {
        // Numbers need no root (and no materialized stage) to resolve.
        let numeric = spec.split(':').all(|p| p.parse::<u32>().is_ok());
        let users = if numeric {
            kiln_agent::users::Users::default()
        } else {
            step_jail::root_users(&self.materialize(idx, st)?)
        };
        users
            .chown_owner(spec)
            .map_err(|e| derr(&self.df.file, ins, format!("--chown={spec}: {e}")))
    }

    /// Earlier stage `s`'s tree (materialized if it is not yet).
    fn stage_root(&mut self, s: usize) -> Result<PathBuf> {
        let mut sst = self.stages[s].take().expect("built");
        let r = self.materialize(s, &mut sst);
        self.stages[s] = Some(sst);
        r
    }

    /// Where a lone file source goes when the destination, given without a trailing slash,
    /// is a directory in the image: inside it, with the root the source is read from. None
    /// when that is not the case.
    fn single_file_into_dir(
        &mut self,
        idx: usize,
        st: &mut StageState,
        spec: &CopySpec<'_>,
        from_stage: Option<(usize, blake3::Hash)>,
    ) -> Result<Option<(String, PathBuf)>> {
        let w = spec.srcs;
        let single = (w.len() == 1 && !w[0].starts_with("<<") && !w[0].contains(['*', '?']))
            .then(|| clean_rel(&w[0]))
            .flatten()
            .filter(|_| !spec.dest_is_dir);
        let Some(rel) = single else {
            return Ok(None);
        };
        let src_root = match from_stage {
            Some((s, _)) => self.stage_root(s)?,
            None => self.opts.context.clone(),
        };
        let src_is_dir = std::fs::symlink_metadata(src_root.join(&rel))
            .map(|m| m.is_dir())
            .unwrap_or(true);
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned());
        let (false, Some(name)) = (src_is_dir, name) else {
            return Ok(None);
        };
        let root = self.materialize(idx, st)?;
        let inside = format!("{}/{name}", spec.dest.trim_end_matches('/'));
        Ok(real_dir_in(&root, spec.dest).then_some((inside, src_root)))
    }

    pub(super) fn write_copy_tar(
        &self,
        src_root: &Path,
        is_context: bool,
        spec: &CopySpec<'_>,
        out: &Path,
        ins: &Instruction,
    ) -> Result<()> {
        let sources = self.copy_sources(src_root, is_context, spec, ins)?;
        let f = std::fs::File::create(out).ctx("create", out)?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(f));
        self.write_copy_entries(&mut b, sources, spec, out, ins)?;
        let mut w = b.into_inner().ctx("finish", out)?;
        w.flush().ctx("write", out)?;
        Ok(())
    }

    /// Where each source of a COPY/ADD goes: heredocs, URLs (fetched), and the context's or
    /// a stage's paths (globs expanded, directories walked, `.dockerignore` applied).
    fn copy_sources(
        &self,
        src_root: &Path,
        is_context: bool,
        spec: &CopySpec<'_>,
        ins: &Instruction,
    ) -> Result<CopySources> {
        let file = &self.df.file;
        let dest = spec.dest;
        let mut out = CopySources::default();
        for s in spec.srcs {
            if let Some(h) = s
                .strip_prefix("<<")
                .and_then(|n| spec.heredocs.iter().find(|h| h.name == n))
            {
                let body = if h.expand {
                    dockerfile::expand_vars(&h.body, spec.vars).map_err(|e| derr(file, ins, e))?
                } else {
                    h.body.clone()
                };
                let d = if spec.dest_is_dir {
                    format!("{}/{}", dest.trim_end_matches('/'), h.name)
                } else {
                    dest.to_string()
                };
                out.inline.push((d, body.into_bytes()));
                continue;
            }
            if ins.keyword == "ADD" && crate::add::is_url(s) {
                let add_err = |e: Error| derr(file, ins, e.to_string());
                let d = if spec.dest_is_dir {
                    let n = crate::add::url_file_name(s).map_err(add_err)?;
                    format!("{}/{n}", dest.trim_end_matches('/'))
                } else {
                    dest.to_string()
                };
                let host =
                    crate::add::fetch_url(s, spec.checksum, self.work.path()).map_err(add_err)?;
                out.entries.push((d, host));
                continue;
            }
            if spec.checksum.is_some() {
                return Err(derr(file, ins, "--checksum applies to URL sources only"));
            }
            let rel = clean_rel(s).ok_or_else(|| {
                derr(
                    file,
                    ins,
                    format!("{s}: source leads outside the build context"),
                )
            })?;
            let matches = expand_glob(src_root, &rel);
            if matches.is_empty() {
                let place = if is_context {
                    "build context"
                } else {
                    "source stage"
                };
                return Err(derr(file, ins, format!("{s}: no such file in the {place}")));
            }
            for m in matches {
                self.add_copy_path(&mut out, src_root, &m, is_context, spec, ins)?;
            }
        }
        Ok(out)
    }

    /// One matched source path: a directory's contents, a local archive for ADD, or a file.
    fn add_copy_path(
        &self,
        out: &mut CopySources,
        src_root: &Path,
        m: &Path,
        is_context: bool,
        spec: &CopySpec<'_>,
        ins: &Instruction,
    ) -> Result<()> {
        let dest = spec.dest;
        let host = src_root.join(m);
        let meta = std::fs::symlink_metadata(&host).ctx("lstat", &host)?;
        if is_context && self.ignored(m) {
            return Ok(());
        }
        if meta.is_dir() {
            let mut stack = vec![PathBuf::new()];
            while let Some(sub) = stack.pop() {
                let dir = host.join(&sub);
                for e in std::fs::read_dir(&dir).ctx("read dir", &dir)? {
                    let e = e.ctx("read dir", &dir)?;
                    let r = sub.join(e.file_name());
                    if is_context && self.ignored(&m.join(&r)) {
                        continue;
                    }
                    let d = format!("{}/{}", dest.trim_end_matches('/'), r.display());
                    if e.file_type().ctx("stat", e.path())?.is_dir() {
                        stack.push(r);
                    }
                    out.entries.push((d, e.path()));
                }
            }
        } else if ins.keyword == "ADD" && is_context && crate::add::is_archive(&host)? {
            // A local tar archive is unpacked into the destination directory.
            out.archives.push(host);
        } else {
            let d = if spec.dest_is_dir || dest.ends_with('/') {
                let name = m
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("{}/{name}", dest.trim_end_matches('/'))
            } else {
                dest.to_string()
            };
            out.entries.push((d, host));
        }
        Ok(())
    }

    /// The layer's tar: the destination directory, the sources in name order (owner, mode
    /// and a zero time: the same sources give the same bytes), archives, heredoc files.
    fn write_copy_entries<W: Write>(
        &self,
        b: &mut tar::Builder<W>,
        sources: CopySources,
        spec: &CopySpec<'_>,
        out: &Path,
        ins: &Instruction,
    ) -> Result<()> {
        let CopySources {
            mut entries,
            inline,
            archives,
        } = sources;
        let header = |kind: tar::EntryType, mode: u32| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(0);
            h.set_mtime(0);
            let (u, g) = spec.owner.unwrap_or((0, 0));
            h.set_uid(u as u64);
            h.set_gid(g as u64);
            h
        };
        if spec.dest_is_dir || entries.len() > 1 {
            // The destination directory itself, so its mode is defined.
            let d = spec.dest.trim_start_matches('/').trim_end_matches('/');
            if !d.is_empty() {
                let mut h = header(tar::EntryType::Directory, 0o755);
                b.append_data(&mut h, format!("{d}/"), std::io::empty())
                    .ctx("write", out)?;
            }
        }
        entries.sort();
        entries.dedup_by(|a, b| a.0 == b.0);
        for (d, host) in entries {
            let m = std::fs::symlink_metadata(&host).ctx("lstat", &host)?;
            let mode = spec.chmod.unwrap_or(m.mode() & 0o7777);
            let name = d.trim_start_matches('/').to_string();
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&host).ctx("readlink", &host)?;
                let mut h = header(tar::EntryType::Symlink, mode);
                b.append_link(&mut h, &name, &t).ctx("write", out)?;
            } else if m.is_dir() {
                let mut h = header(tar::EntryType::Directory, mode);
                b.append_data(&mut h, format!("{name}/"), std::io::empty())
                    .ctx("write", out)?;
            } else if m.is_file() {
                let f = std::fs::File::open(&host).ctx("open", &host)?;
                let mut h = header(tar::EntryType::Regular, mode);
                h.set_size(m.len());
                b.append_data(&mut h, &name, f).ctx("write", out)?;
            } else {
                return Err(derr(
                    &self.df.file,
                    ins,
                    format!(
                        "{}: only files, directories and symlinks can be copied",
                        host.display()
                    ),
                ));
            }
        }
        for (i, a) in archives.iter().enumerate() {
            let scratch = self.work.path().join(format!("add-check-{}-{i}", ins.line));
            crate::add::append_archive(b, a, spec.dest, spec.owner, &scratch)
                .map_err(|e| derr(&self.df.file, ins, e.to_string()))?;
        }
        for (d, data) in inline {
            let mut h = header(tar::EntryType::Regular, spec.chmod.unwrap_or(0o644));
            h.set_size(data.len() as u64);
            b.append_data(&mut h, d.trim_start_matches('/'), &data[..])
                .ctx("write", out)?;
        }
        Ok(())
    }

    pub(super) fn ignored(&self, rel: &Path) -> bool {
        let comps: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        let mut ignored = false;
        // A path is ignored if it or any parent matches the last matching pattern.
        for n in 1..=comps.len() {
            for (neg, pat) in &self.ignore {
                if glob_match(pat, &comps[..n]) {
                    ignored = !neg;
                }
            }
            if ignored && n < comps.len() {
                // Exceptions below an ignored directory still count.
                let deeper = self.ignore.iter().any(|(neg, _)| *neg);
                if !deeper {
                    return true;
                }
            }
        }
        ignored
    }
}

/// What a COPY/ADD puts in its layer.
#[derive(Default)]
struct CopySources {
    /// (destination path, host path)
    entries: Vec<(String, PathBuf)>,
    /// Heredoc files: (destination path, contents)
    inline: Vec<(String, Vec<u8>)>,
    /// Local archives ADD unpacks into the destination.
    archives: Vec<PathBuf>,
}

/// A COPY/ADD's flags, expanded.
struct CopyFlags {
    from: Option<String>,
    chown: Option<String>,
    chmod: Option<u32>,
    checksum: Option<String>,
}

fn copy_flags(file: &str, ins: &Instruction, vars: &HashMap<String, String>) -> Result<CopyFlags> {
    let mut f = CopyFlags {
        from: None,
        chown: None,
        chmod: None,
        checksum: None,
    };
    for (k, v) in &ins.flags {
        let v = dockerfile::expand_words(v, vars)
            .map_err(|e| derr(file, ins, e))?
            .join("");
        match k.as_str() {
            "from" => f.from = Some(v),
            "chown" => f.chown = Some(v),
            "chmod" => {
                let mode = u32::from_str_radix(&v, 8)
                    .map_err(|_| derr(file, ins, format!("--chmod={v} is not an octal mode")))?;
                f.chmod = Some(mode);
            }
            "link" => {}
            "checksum" if ins.keyword == "ADD" => f.checksum = Some(v),
            other => {
                let why = format!("{} --{other} is not supported", ins.keyword);
                return Err(derr(file, ins, why));
            }
        }
    }
    Ok(f)
}
