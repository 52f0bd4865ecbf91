//! Dockerfile parser: parser directives, comments, line continuations, heredocs, JSON (exec)
//! and shell forms, flags; and the word/variable expansion the builder applies per instruction.

use crate::error::{Error, Result};
use std::collections::HashMap;

/// One instruction, with its 1-based line number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instruction {
    pub line: usize,
    /// Upper-case keyword (FROM, RUN, ...).
    pub keyword: String,
    /// `--name=value` flags before the arguments (`--name` alone gives an empty value).
    pub flags: Vec<(String, String)>,
    pub args: Args,
    pub heredocs: Vec<Heredoc>,
    /// The instruction as written (continuations joined), for history and cache keys.
    pub original: String,
}

/// The arguments: JSON array (exec form) or the raw rest of the line (shell form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Args {
    Exec(Vec<String>),
    Shell(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heredoc {
    pub name: String,
    pub body: String,
    /// Whether `$VAR` expands in the body (the delimiter was not quoted).
    pub expand: bool,
}

/// A parsed Dockerfile: global ARGs (before the first FROM) and stages.
#[derive(Clone, Debug, Default)]
pub struct Dockerfile {
    pub file: String,
    pub global_args: Vec<Instruction>,
    pub stages: Vec<Stage>,
}

#[derive(Clone, Debug)]
pub struct Stage {
    pub from: Instruction,
    /// `FROM x AS name`.
    pub name: Option<String>,
    pub instructions: Vec<Instruction>,
}

const KNOWN: &[&str] = &[
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
];

fn err(file: &str, line: usize, msg: impl Into<String>) -> Error {
    Error::Dockerfile {
        file: file.to_string(),
        line,
        msg: msg.into(),
    }
}

/// Parses a Dockerfile's text. `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Dockerfile> {
    let lines: Vec<&str> = text.lines().collect();
    let (escape, mut i) = directives(&lines, file)?;
    let mut df = Dockerfile {
        file: file.to_string(),
        ..Default::default()
    };
    while i < lines.len() {
        let start = i;
        let first = lines[i].trim_start();
        i += 1;
        if first.is_empty() || first.starts_with('#') {
            continue;
        }
        let logical = join_continuations(&lines, &mut i, first, escape);
        let (kw, rest) = match logical.find(char::is_whitespace) {
            Some(p) => (&logical[..p], logical[p..].trim_start()),
            None => (logical.as_str(), ""),
        };
        let keyword = kw.to_ascii_uppercase();
        if !KNOWN.contains(&keyword.as_str()) {
            return Err(err(file, start + 1, format!("unknown instruction {kw:?}")));
        }
        let (flags, mut rest) = split_flags(&keyword, rest);
        let mut heredocs = Vec::new();
        if matches!(keyword.as_str(), "RUN" | "COPY" | "ADD") {
            let words;
            (heredocs, words) = take_heredocs(&lines, &mut i, &rest)
                .map_err(|name| err(file, start + 1, format!("heredoc <<{name} is not closed")))?;
            if !heredocs.is_empty() {
                rest = words;
            }
        }
        let args = match rest.starts_with('[') {
            true => serde_json::from_str::<Vec<String>>(&rest)
                .map(Args::Exec)
                .unwrap_or(Args::Shell(rest)),
            false => Args::Shell(rest),
        };
        let ins = Instruction {
            line: start + 1,
            keyword,
            flags,
            args,
            heredocs,
            original: logical.clone(),
        };
        place(&mut df, ins, file)?;
    }
    if df.stages.is_empty() {
        return Err(err(file, lines.len().max(1), "no FROM instruction"));
    }
    Ok(df)
}

/// Parser directives (`# key=value` lines at the very top): the escape character, and the
/// index of the first line after them.
fn directives(lines: &[&str], file: &str) -> Result<(char, usize)> {
    let mut escape = '\\';
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim();
        let Some(d) = l.strip_prefix('#') else { break };
        let Some((k, v)) = d.split_once('=') else {
            break;
        };
        let k = k.trim().to_ascii_lowercase();
        if k.contains(' ') {
            break;
        }
        match k.as_str() {
            "escape" => {
                escape = match v.trim() {
                    "\\" => '\\',
                    "`" => '`',
                    other => {
                        return Err(err(file, i + 1, format!("bad escape directive {other:?}")))
                    }
                }
            }
            "syntax" | "check" => {}
            _ => break,
        }
        i += 1;
    }
    Ok((escape, i))
}

/// The logical line starting with `first`: continuation lines joined (`i` moves past them),
/// comment lines inside a continuation dropped.
fn join_continuations(lines: &[&str], i: &mut usize, first: &str, escape: char) -> String {
    let mut logical = String::new();
    let mut cur = first.to_string();
    loop {
        let t = cur.trim_end();
        let Some(stripped) = t.strip_suffix(escape) else {
            logical.push_str(t);
            break;
        };
        logical.push_str(stripped);
        logical.push(' ');
        // Next non-comment line.
        loop {
            if *i >= lines.len() {
                cur = String::new();
                break;
            }
            let n = lines[*i];
            *i += 1;
            if n.trim_start().starts_with('#') {
                continue;
            }
            cur = n.to_string();
            break;
        }
        if *i >= lines.len() && cur.is_empty() {
            break;
        }
    }
    logical.trim().to_string()
}

/// Leading `--flag[=value]` words (for RUN only when the arguments start with one).
fn split_flags(keyword: &str, rest: &str) -> (Vec<(String, String)>, String) {
    let mut rest = rest.to_string();
    let mut flags = Vec::new();
    if keyword != "RUN" || rest.starts_with("--") {
        while rest.starts_with("--") {
            let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
            let flag = &rest[2..end];
            let (k, v) = flag.split_once('=').unwrap_or((flag, ""));
            flags.push((k.to_string(), v.to_string()));
            rest = rest[end..].trim_start().to_string();
        }
    }
    (flags, rest)
}

/// Heredocs named in `rest` (`<<EOF`, `<<-EOF`, `<<"EOF"`), their bodies read from the lines
/// at `i` on, and `rest` with each as `<<NAME`; Err(name) for one never closed.
fn take_heredocs(
    lines: &[&str],
    i: &mut usize,
    rest: &str,
) -> std::result::Result<(Vec<Heredoc>, String), String> {
    let mut heredocs = Vec::new();
    let mut words = Vec::new();
    for w in rest.split_whitespace() {
        let Some(h) = w.strip_prefix("<<") else {
            words.push(w.to_string());
            continue;
        };
        let strip = h.starts_with('-');
        let h = h.trim_start_matches('-');
        let quoted = h.starts_with('"') || h.starts_with('\'');
        let name = h.trim_matches(|c| c == '"' || c == '\'').to_string();
        if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
            words.push(w.to_string());
            continue;
        }
        let mut body = String::new();
        let mut closed = false;
        while *i < lines.len() {
            let l = lines[*i];
            *i += 1;
            let cmp = if strip { l.trim_start_matches('\t') } else { l };
            if cmp == name {
                closed = true;
                break;
            }
            body.push_str(cmp);
            body.push('\n');
        }
        if !closed {
            return Err(name);
        }
        words.push(format!("<<{name}"));
        heredocs.push(Heredoc {
            name,
            body,
            expand: !quoted,
        });
    }
    Ok((heredocs, words.join(" ")))
}

/// Puts `ins` where it belongs: a new stage (FROM), the global ARGs, or the current stage.
fn place(df: &mut Dockerfile, ins: Instruction, file: &str) -> Result<()> {
    match ins.keyword.as_str() {
        "FROM" => {
            let Args::Shell(s) = &ins.args else {
                return Err(err(file, ins.line, "FROM takes an image reference"));
            };
            let words: Vec<&str> = s.split_whitespace().collect();
            let name = match words.as_slice() {
                [_] => None,
                [_, as_, n] if as_.eq_ignore_ascii_case("as") => Some(n.to_ascii_lowercase()),
                _ => return Err(err(file, ins.line, "FROM expects `FROM image [AS name]`")),
            };
            df.stages.push(Stage {
                from: ins,
                name,
                instructions: Vec::new(),
            });
        }
        "ARG" if df.stages.is_empty() => df.global_args.push(ins),
        _ => match df.stages.last_mut() {
            Some(s) => s.instructions.push(ins),
            None => {
                let why = format!(
                    "{} before the first FROM (only ARG may come first)",
                    ins.keyword
                );
                return Err(err(file, ins.line, why));
            }
        },
    }
    Ok(())
}

/// Expands `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR:+alt}` and handles quotes and escapes,
/// splitting into words on unquoted whitespace (Dockerfile word rules).
pub fn expand_words(
    s: &str,
    vars: &HashMap<String, String>,
) -> std::result::Result<Vec<String>, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut i = 0;
    let mut quote: Option<char> = None;
    while i < chars.len() {
        let c = chars[i];
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
                i += 1;
            }
            (None, '\'') | (None, '"') => {
                quote = Some(c);
                in_word = true;
                i += 1;
            }
            (Some(q), c) if c == q => {
                quote = None;
                i += 1;
            }
            (Some('\''), c) => {
                cur.push(c);
                i += 1;
            }
            (_, '\\') if i + 1 < chars.len() => {
                cur.push(chars[i + 1]);
                in_word = true;
                i += 2;
            }
            (_, '$') => {
                in_word = true;
                let (val, used) = expand_var(&chars[i..], vars)?;
                cur.push_str(&val);
                i += used;
            }
            (_, c) => {
                cur.push(c);
                in_word = true;
                i += 1;
            }
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".into());
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Expands variables only (no quote handling, no splitting): for heredoc bodies.
pub fn expand_vars(s: &str, vars: &HashMap<String, String>) -> std::result::Result<String, String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '$' {
            let (v, used) = expand_var(&chars[i..], vars)?;
            out.push_str(&v);
            i += used;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// `chars` starts at a `$`. Returns the expansion and how many chars it consumed.
fn expand_var(
    chars: &[char],
    vars: &HashMap<String, String>,
) -> std::result::Result<(String, usize), String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    if chars.len() > 1 && chars[1] == '{' {
        let end = chars
            .iter()
            .position(|&c| c == '}')
            .ok_or_else(|| "missing `}` in variable".to_string())?;
        let inner: String = chars[2..end].iter().collect();
        let (name, op, word) = if let Some(p) = inner.find(":-") {
            (&inner[..p], "-", &inner[p + 2..])
        } else if let Some(p) = inner.find(":+") {
            (&inner[..p], "+", &inner[p + 2..])
        } else {
            (inner.as_str(), "", "")
        };
        if name.is_empty() || !name.chars().all(is_name) {
            return Err(format!("bad variable ${{{inner}}}"));
        }
        let val = vars.get(name).filter(|v| !v.is_empty());
        let out = match op {
            "-" => val.cloned().unwrap_or_else(|| word.to_string()),
            "+" => val.map(|_| word.to_string()).unwrap_or_default(),
            _ => vars.get(name).cloned().unwrap_or_default(),
        };
        Ok((out, end + 1))
    } else {
        let n = chars[1..].iter().take_while(|&&c| is_name(c)).count();
        if n == 0 {
            return Ok(("$".into(), 1));
        }
        let name: String = chars[1..1 + n].iter().collect();
        Ok((vars.get(&name).cloned().unwrap_or_default(), 1 + n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms_continuations_heredocs() {
        let text = "# syntax=docker/dockerfile:1\nARG BASE=busybox\nFROM $BASE AS build\n\
            # a comment\nRUN echo a \\\n  # dropped\n  && echo b\nCOPY --chown=1:2 a b /dst/\n\
            CMD [\"/bin/sh\", \"-c\", \"x\"]\nRUN <<EOF\necho hi\nEOF\nfrom build\n";
        let df = parse(text, "Dockerfile").unwrap();
        assert_eq!(df.global_args.len(), 1);
        assert_eq!(df.stages.len(), 2);
        assert_eq!(df.stages[0].name.as_deref(), Some("build"));
        let ins = &df.stages[0].instructions;
        assert_eq!(ins[0].args, Args::Shell("echo a    && echo b".into()));
        assert_eq!(ins[0].line, 5);
        assert_eq!(ins[1].flags, vec![("chown".to_string(), "1:2".to_string())]);
        assert_eq!(
            ins[2].args,
            Args::Exec(vec!["/bin/sh".into(), "-c".into(), "x".into()])
        );
        assert_eq!(ins[3].heredocs[0].body, "echo hi\n");
        assert_eq!(ins[3].line, 10);
    }

    #[test]
    fn errors_have_line_numbers() {
        let e = parse("FROM a\n\nFROBNICATE x\n", "Dockerfile").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Dockerfile:3: unknown instruction \"FROBNICATE\""
        );
        let e = parse("RUN x\n", "Df").unwrap_err();
        assert!(e.to_string().starts_with("Df:1:"), "{e}");
        assert!(parse("FROM a\nRUN <<EOF\nx\n", "Df").is_err());
    }

    #[test]
    fn expansion() {
        let mut v = HashMap::new();
        v.insert("A".to_string(), "x y".to_string());
        assert_eq!(
            expand_words("k=\"$A\" ${B:-d} '$A' \\$A", &v).unwrap(),
            vec!["k=x y", "d", "$A", "$A"]
        );
        assert_eq!(expand_words("${A:+set}${B:+no}", &v).unwrap(), vec!["set"]);
    }
}
