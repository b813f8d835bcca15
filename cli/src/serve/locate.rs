//! Where the programs and files serve needs are: the same variables `scripts/env.sh` exports
//! (`KVMESH_NATS_SERVER`, `KVMESH_ENVOY`, `KVMESH_FILTER_WASM`, `KVMESH_TOKENIZERS`), then PATH,
//! then the places `make setup` puts them; and a model's tokenizer files in the HuggingFace cache.

use std::path::{Path, PathBuf};

/// A program or file as found, or the name it was looked for under.
#[derive(Clone, Debug)]
pub struct Located {
    /// The path found, or the bare name / expected path when not found.
    pub path: PathBuf,
    /// Whether it exists.
    pub found: bool,
    /// What to do when it is missing (starts with "; ").
    pub hint: String,
}

impl Located {
    fn found(path: PathBuf) -> Located {
        Located { path, found: true, hint: String::new() }
    }

    /// The path, or an error naming `what`, where it was looked for and how to get it.
    pub fn require(&self, what: &str) -> anyhow::Result<&Path> {
        if self.found {
            Ok(&self.path)
        } else {
            anyhow::bail!("{what} not found ({}){}", self.path.display(), self.hint)
        }
    }
}

/// A non-empty environment variable.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The kvmesh cache: `$KVMESH_CACHE`, else `${XDG_CACHE_HOME:-$HOME/.cache}/kvmesh` (as env.sh).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env_var("KVMESH_CACHE") {
        return PathBuf::from(dir);
    }
    user_cache().join("kvmesh")
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}`.
fn user_cache() -> PathBuf {
    env_var("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env_var("HOME").unwrap_or_else(|| "/root".to_owned())).join(".cache")
    })
}

/// `name` on PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// A program: `$var` if set (it must exist), else `name` on PATH, else the first fallback that exists.
pub fn program(var: Option<&str>, name: &str, fallbacks: &[PathBuf], hint: &str) -> Located {
    let hint = format!("; {hint}");
    if let Some(var) = var
        && let Some(value) = env_var(var)
    {
        let path = PathBuf::from(value);
        return if path.is_file() {
            Located::found(path)
        } else {
            Located { path, found: false, hint: format!(" (from ${var}){hint}") }
        };
    }
    if let Some(path) = on_path(name) {
        return Located::found(path);
    }
    if let Some(path) = fallbacks.iter().find(|p| p.is_file()) {
        return Located::found(path.clone());
    }
    Located { path: PathBuf::from(name), found: false, hint }
}

/// The hint for what `make setup` installs.
const SETUP_HINT: &str = "run `make setup` (or `bash scripts/setup.sh`)";

/// nats-server: `$KVMESH_NATS_SERVER`, PATH, Debian's /usr/sbin.
pub fn nats_server() -> Located {
    let hint = format!("{SETUP_HINT}, install nats-server, or set KVMESH_NATS_SERVER");
    program(Some("KVMESH_NATS_SERVER"), "nats-server", &[PathBuf::from("/usr/sbin/nats-server")], &hint)
}

/// Envoy: `$KVMESH_ENVOY`, PATH, the binary setup.sh links into the cache.
pub fn envoy() -> Located {
    let hint = format!("{SETUP_HINT}, install Envoy 1.35 or newer, or set KVMESH_ENVOY");
    program(Some("KVMESH_ENVOY"), "envoy", &[cache_dir().join("bin/envoy")], &hint)
}

/// The filter module: `--filter-wasm`, `$KVMESH_FILTER_WASM`, else where `make wasm` writes it.
pub fn filter_wasm(flag: Option<&Path>) -> Located {
    built_file(
        flag,
        "KVMESH_FILTER_WASM",
        "wasm32-wasip1/wasm/kvmesh_filter.wasm",
        "make wasm",
        "--filter-wasm",
    )
}

/// The native filter module: `--filter-native`, `$KVMESH_FILTER_NATIVE`, else where `make native`
/// writes it.
pub fn filter_native(flag: Option<&Path>) -> Located {
    built_file(
        flag,
        "KVMESH_FILTER_NATIVE",
        "release/libkvmesh_filter_native.so",
        "make native",
        "--filter-native",
    )
}

/// A file this repository builds: `flag`, else `$variable`, else `in_target` under the cargo
/// target dir (`$CARGO_TARGET_DIR`, else the cache's), with a hint naming the `make` target.
fn built_file(flag: Option<&Path>, variable: &str, in_target: &str, make: &str, flag_name: &str) -> Located {
    let hint = format!("; run `{make}` to build it (or pass {flag_name})");
    let path = match flag {
        Some(path) => path.to_path_buf(),
        None => match env_var(variable) {
            Some(path) => PathBuf::from(path),
            None => {
                let target = env_var("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| cache_dir().join("target"));
                target.join(in_target)
            }
        },
    };
    let found = path.is_file();
    Located { path, found, hint }
}

/// The tokenizer directory of `model`: `--tokenizer-dir`; the model itself when it is a local
/// directory; its files in the HuggingFace hub cache; or, for Qwen3 and Llama 3.1 models, the files
/// `make setup` fetched into `$KVMESH_TOKENIZERS`.
pub fn tokenizer_dir(flag: Option<&Path>, model: &str) -> Located {
    let hint = format!(
        "; pass --tokenizer-dir DIR (a directory with tokenizer.json), or fetch the files into the \
         HuggingFace cache: `hf download {model} tokenizer.json tokenizer_config.json`"
    );
    if let Some(dir) = flag {
        let found = dir.join("tokenizer.json").is_file();
        let hint = "; the --tokenizer-dir must hold tokenizer.json".to_owned();
        return Located { path: dir.to_path_buf(), found, hint };
    }
    let local = Path::new(model);
    if local.join("tokenizer.json").is_file() {
        return Located::found(local.to_path_buf());
    }
    if let Some(dir) = hf_cache_snapshot(model) {
        return Located::found(dir);
    }
    if let Some(dir) = fetched_tokenizer(model) {
        return Located::found(dir);
    }
    // Where the files would be once downloaded into the HuggingFace cache.
    Located { path: hf_repo(model), found: false, hint }
}

/// The HuggingFace hub cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, `~/.cache/huggingface/hub`).
fn hf_hub_cache() -> PathBuf {
    if let Some(dir) = env_var("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    match env_var("HF_HOME") {
        Some(home) => PathBuf::from(home).join("hub"),
        None => user_cache().join("huggingface/hub"),
    }
}

/// The hub cache's directory of `model`'s repository.
fn hf_repo(model: &str) -> PathBuf {
    hf_repo_in(&hf_hub_cache(), model)
}

fn hf_repo_in(hub: &Path, model: &str) -> PathBuf {
    hub.join(format!("models--{}", model.replace('/', "--")))
}

/// The snapshot of `model` in the hub cache that has `tokenizer.json`.
fn hf_cache_snapshot(model: &str) -> Option<PathBuf> {
    hf_snapshot_in(&hf_hub_cache(), model)
}

/// The snapshot of `model` under `hub` that has `tokenizer.json`: the one `refs/main` names, else any.
fn hf_snapshot_in(hub: &Path, model: &str) -> Option<PathBuf> {
    let repo = hf_repo_in(hub, model);
    let main = std::fs::read_to_string(repo.join("refs/main")).ok();
    let preferred = main.map(|rev| repo.join("snapshots").join(rev.trim()));
    let others = std::fs::read_dir(repo.join("snapshots")).ok()?.filter_map(|e| e.ok().map(|e| e.path()));
    preferred.into_iter().chain(others).find(|dir| dir.join("tokenizer.json").is_file())
}

/// The tokenizer files `make setup` fetched, for a model of that family.
fn fetched_tokenizer(model: &str) -> Option<PathBuf> {
    let root =
        env_var("KVMESH_TOKENIZERS").map(PathBuf::from).unwrap_or_else(|| cache_dir().join("tokenizers"));
    let name = model.to_ascii_lowercase();
    let family = if name.contains("qwen3") {
        "qwen3"
    } else if name.contains("llama-3.1") || name.contains("llama3.1") || name.contains("llama-3_1") {
        "llama3_1"
    } else {
        return None;
    };
    let dir = root.join(family);
    dir.join("tokenizer.json").is_file().then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_says_how_to_get_it() {
        let located = program(None, "kvmesh-no-such-program", &[], "install it");
        assert!(!located.found);
        let err = located.require("the thing").unwrap_err().to_string();
        assert!(err.contains("the thing not found (kvmesh-no-such-program); install it"), "{err}");
    }

    #[test]
    fn the_hub_cache_snapshot_that_refs_main_names_is_found() {
        let hub = std::env::temp_dir().join(format!("kvmesh-locate-test-{}", std::process::id()));
        let repo = hub.join("models--Org--Model");
        let snapshot = repo.join("snapshots/abc123");
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        assert_eq!(hf_snapshot_in(&hub, "Org/Model"), None, "no tokenizer.json yet");
        std::fs::write(snapshot.join("tokenizer.json"), "{}").unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(hf_snapshot_in(&hub, "Org/Model"), Some(snapshot));
        std::fs::remove_dir_all(&hub).unwrap();
    }

    #[test]
    fn a_tokenizer_dir_flag_without_tokenizer_json_is_not_found() {
        let located = tokenizer_dir(Some(Path::new("/nonexistent/kvmesh")), "m");
        assert!(!located.found);
        assert!(located.require("tokenizer").unwrap_err().to_string().contains("tokenizer.json"));
    }
}
