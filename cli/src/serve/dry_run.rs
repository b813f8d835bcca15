//! `kvmesh serve --dry-run`: the plan as a shell script a user can read or paste: each generated
//! file as a here-document, then each command line (quoted for a POSIX shell), in start order.

use std::fmt::Write as _;

use super::plan::Plan;

/// A word quoted for a POSIX shell: left alone when it has no special characters, else in single
/// quotes (a `'` inside becomes `'\''`).
pub fn shell_quote(word: &str) -> String {
    let plain =
        !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:,=@%+".contains(&b));
    if plain { word.to_owned() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

/// A command line with its environment, quoted.
pub fn command_line(env: &[(String, String)], program: &str, args: &[String]) -> String {
    let mut words: Vec<String> = env.iter().map(|(k, v)| format!("{k}={}", shell_quote(v))).collect();
    words.push(shell_quote(program));
    words.extend(args.iter().map(|a| shell_quote(a)));
    words.join(" ")
}

/// The whole plan as a script.
pub fn script(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "#!/bin/sh");
    let _ = writeln!(
        out,
        "# kvmesh serve --dry-run: {} on {} {} worker(s); nothing was started.",
        plan.model,
        plan.workers.len(),
        match plan.backend {
            super::engines::Backend::Sim => format!("simulated {}", plan.engine.name()),
            other => format!("{other:?}").to_lowercase(),
        }
    );
    let _ = writeln!(out, "# Files first, then the processes in start order (each runs in the background).");
    for (what, located) in plan.required.iter().filter(|(_, l)| !l.found) {
        let _ = writeln!(out, "# NOTE: {what} not found ({}){}", located.path.display(), located.hint);
    }
    let _ = writeln!(out, "set -e");
    let _ = writeln!(out, "mkdir -p {}", shell_quote(&plan.run_dir.display().to_string()));
    for dir in &plan.dirs {
        let _ = writeln!(out, "mkdir -p {}", shell_quote(&dir.display().to_string()));
    }
    for file in &plan.files {
        let _ = writeln!(out, "\n# {}", file.what);
        let _ = writeln!(out, "cat > {} <<'KVMESH_EOF'", shell_quote(&file.path.display().to_string()));
        out.push_str(&file.contents);
        if !file.contents.ends_with('\n') {
            out.push('\n');
        }
        let _ = writeln!(out, "KVMESH_EOF");
    }
    for spec in &plan.processes {
        let _ = writeln!(out, "\n# {}", spec.name);
        let line = command_line(&spec.env, &spec.program.display().to_string(), &spec.args);
        let log = plan.run_dir.join(format!("{}.log", spec.name));
        let _ = writeln!(out, "{line} > {} 2>&1 &", shell_quote(&log.display().to_string()));
    }
    let p = &plan.ports;
    let _ = writeln!(
        out,
        "\n# endpoint     http://{}:{}/v1/chat/completions",
        display_host(&plan.listen),
        p.listen
    );
    let _ = writeln!(
        out,
        "# admin        http://127.0.0.1:{}  (bearer token: KVMESH_ADMIN_TOKEN above)",
        p.admin
    );
    let _ = writeln!(out, "# envoy admin  http://127.0.0.1:{}", p.envoy_admin);
    let _ = writeln!(out, "wait");
    out
}

/// The host clients use for a listen address (`0.0.0.0` listens everywhere, reach it on loopback).
pub fn display_host(listen: &str) -> &str {
    if listen == "0.0.0.0" || listen == "::" { "127.0.0.1" } else { listen }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_words_stay_and_others_are_single_quoted() {
        assert_eq!(shell_quote("--port"), "--port");
        assert_eq!(shell_quote("tcp://127.0.0.1:5557"), "tcp://127.0.0.1:5557");
        assert_eq!(shell_quote(r#"{"a":1}"#), r#"'{"a":1}'"#);
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn environment_comes_first() {
        let line = command_line(&[("A".into(), "1 2".into())], "vllm", &["serve".into(), "m".into()]);
        assert_eq!(line, "A='1 2' vllm serve m");
    }
}
