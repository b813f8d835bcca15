//! The control plane's state applied to one VM's [`Router`]: workers by handle, loads, the KV index,
//! per-model policies, and models' tokenizer files. Pure (no host calls): unit-tested natively.

use kvmesh_core::hash::BLOCK_HASH_VERSION;
use kvmesh_core::{BlockHash, Policy, RoutingConfig, TokenizerFiles, WorkerId, WorkerInfo, WorkerSlot};
use kvmesh_proto::convert::{engine_from_wire, role_from_wire, state_from_wire};
use kvmesh_proto::v1 as pb;
use pb::state_update::Body;

use crate::config::Error;
use crate::relay::ApplyState;
use crate::router::{Model, Router};

/// Block size used when neither a worker nor the model's assets name one.
const FALLBACK_BLOCK_SIZE: u32 = 16;

impl ApplyState for Router {
    fn reset(&mut self) {
        for (_, slot) in std::mem::take(&mut self.handles) {
            self.forget_slot(slot);
        }
        self.policies.clear();
    }

    fn apply(&mut self, body: &Body) {
        match body {
            Body::Snapshot(s) => {
                self.check_hash_version(s.block_hash_version);
                self.upsert_workers(&s.workers);
                self.apply_loads(&s.loads);
                if self.foreign_hash_version.is_none() {
                    self.apply_index(&s.index);
                }
                self.apply_policies(&s.policies);
            }
            Body::Delta(d) => {
                self.upsert_workers(&d.upserted);
                for handle in &d.removed_workers {
                    if let Some(slot) = self.handles.remove(handle) {
                        self.forget_slot(slot);
                    }
                }
                self.apply_loads(&d.loads);
                if self.foreign_hash_version.is_none() {
                    self.apply_index(&d.index);
                }
                self.apply_policies(&d.policies);
            }
        }
    }
}

impl Router {
    /// Notes the block hash version of a snapshot's index (0 is 1, from a control plane older than
    /// the field). Another version's hashes would match none of this filter's: its index, and that
    /// of the deltas after it, is left out, and requests are scored on load and this proxy's own
    /// recent decisions until a snapshot of this filter's version arrives.
    fn check_hash_version(&mut self, version: u32) {
        let version = version.max(1);
        let foreign = (version != BLOCK_HASH_VERSION).then_some(version);
        if foreign != self.foreign_hash_version {
            match foreign {
                Some(theirs) => log::error!(
                    "kvmesh filter: the control plane hashes blocks with version {theirs}, this filter with \
                     {BLOCK_HASH_VERSION}: its KV index is ignored until both run the same version"
                ),
                None => log::info!("kvmesh filter: the control plane's block hash version matches again"),
            }
        }
        self.foreign_hash_version = foreign;
    }

    /// Removes a control-plane worker from the fleet, the index and every policy's memory.
    fn forget_slot(&mut self, slot: WorkerSlot) {
        let Some(id) = self.fleet.get(slot).map(|e| e.info.id.clone()) else { return };
        self.fleet.remove(&id);
        self.index.clear_worker(slot);
        self.default_policy.forget_worker(slot);
        for policy in self.policies.values_mut() {
            policy.forget_worker(slot);
        }
    }

    fn upsert_workers(&mut self, workers: &[pb::WorkerEntry]) {
        for w in workers {
            let info = WorkerInfo {
                id: WorkerId(w.worker_id.clone()),
                address: w.address.clone(),
                model: w.model.clone(),
                engine: engine_from_wire(w.engine),
                role: role_from_wire(w.role),
                block_size: if w.block_size == 0 { FALLBACK_BLOCK_SIZE } else { w.block_size },
                state: state_from_wire(w.state),
            };
            if let Some(model) = self.models.get_mut(&info.model) {
                model.block_size = info.block_size;
            }
            match self.fleet.upsert(info) {
                Ok(slot) => {
                    self.handles.insert(w.handle, slot);
                }
                Err(err) => log::warn!("kvmesh filter: worker {} not added: {err}", w.worker_id),
            }
        }
    }

    fn apply_loads(&mut self, loads: &[pb::WorkerLoadUpdate]) {
        for l in loads {
            let Some(entry) = self.handles.get(&l.handle).and_then(|&slot| self.fleet.get_mut(slot)) else {
                continue;
            };
            // The engine's own figures; this proxy's in-flight counts stay as they are.
            entry.load.running = l.running;
            entry.load.waiting = l.waiting;
            entry.load.kv_usage = l.kv_usage;
            entry.load.kv_capacity_blocks = l.kv_capacity_blocks;
        }
    }

    fn apply_index(&mut self, updates: &[pb::IndexUpdate]) {
        let mut hashes: Vec<BlockHash> = Vec::new();
        for u in updates {
            let Some(&slot) = self.handles.get(&u.handle) else { continue };
            if u.cleared {
                self.index.clear_worker(slot);
            }
            if !u.removed.is_empty() {
                hashes.clear();
                hashes.extend(u.removed.iter().map(|&h| BlockHash(h)));
                self.index.remove(slot, &hashes);
            }
            if !u.stored.is_empty() {
                hashes.clear();
                hashes.extend(u.stored.iter().map(|&h| BlockHash(h)));
                self.index.store(slot, &hashes);
            }
        }
    }

    fn apply_policies(&mut self, policies: &[pb::PolicyUpdate]) {
        for p in policies {
            // Leniently: a newer control plane may send settings this filter does not know yet.
            let policy = RoutingConfig::from_json_lenient(&p.config_json)
                .map_err(|e| e.to_string())
                .and_then(|(config, ignored)| {
                    if !ignored.is_empty() {
                        log::warn!(
                            "kvmesh filter: policy of model {}: settings unknown to this filter version ignored: {}",
                            p.model,
                            ignored.join(", ")
                        );
                    }
                    Policy::new(config).map_err(|e| e.to_string())
                });
            match policy {
                // The same settings again keep what the policy learnt.
                Ok(policy)
                    if self.policies.get(&p.model).is_some_and(|old| old.config() == policy.config()) => {}
                Ok(policy) => {
                    self.policies.insert(p.model.clone(), policy);
                }
                Err(err) => {
                    log::warn!("kvmesh filter: policy of model {} ignored: {err}", p.model);
                }
            }
        }
    }

    /// Models that workers serve but whose tokenizer is not loaded (or is of other files).
    pub fn models_wanted(&self) -> Vec<String> {
        let mut wanted: Vec<String> = self
            .fleet
            .iter()
            .map(|(_, e)| &e.info.model)
            .filter(|m| !self.models.contains_key(*m))
            .cloned()
            .collect();
        wanted.sort();
        wanted.dedup();
        wanted
    }

    /// Takes the models this router wants (see [`Router::models_wanted`]) that `loaded` has, sharing
    /// their tokenizers: another thread's load serves this one, as [`Router::fork`] does at start.
    /// Returns how many it took.
    pub fn adopt_models(&mut self, loaded: &Router) -> usize {
        let mut adopted = 0;
        for name in self.models_wanted() {
            if let Some(model) = loaded.models.get(&name) {
                self.models.insert(name, model.fork(self.segment_cache));
                adopted += 1;
            }
        }
        adopted
    }

    /// Loads a model from the control plane's `ModelAssets` (the tokenizer as it ships, or its
    /// canonical form; the config and the template beside it). A model already loaded from the same
    /// files is kept.
    pub fn load_assets(&mut self, assets: &pb::ModelAssets) -> Result<(), Error> {
        if self.models.get(&assets.model).is_some_and(|m| m.tokenizer_id == assets.tokenizer_id) {
            return Ok(());
        }
        let not_utf8 = |what: &str| Error::Invalid {
            field: format!("model assets of `{}`", assets.model),
            reason: format!("{what} is not UTF-8"),
        };
        let tokenizer_json = std::str::from_utf8(&assets.tokenizer).map_err(|_| not_utf8("tokenizer"))?;
        let config =
            std::str::from_utf8(&assets.tokenizer_config).map_err(|_| not_utf8("tokenizer_config"))?;
        let files = TokenizerFiles {
            tokenizer_json,
            tokenizer_config_json: (!config.is_empty()).then_some(config),
            chat_template_jinja: (!assets.chat_template.is_empty()).then_some(assets.chat_template.as_str()),
        };
        let block_size = self
            .fleet
            .iter()
            .find(|(_, e)| e.info.model == assets.model)
            .map(|(_, e)| e.info.block_size)
            .or((assets.block_size > 0).then_some(assets.block_size))
            .unwrap_or(FALLBACK_BLOCK_SIZE);
        let model =
            Model::load(&assets.model, files, block_size, assets.tokenizer_id.clone(), self.segment_cache)?;
        self.models.insert(assets.model.clone(), model);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kvmesh_core::request::Endpoint;

    use super::*;
    use crate::config::FilterConfig;
    use crate::router::{Degraded, RejectKind};

    const TTL_MS: u64 = 1_000;

    fn router() -> Router {
        let json = format!(r#"{{"state":{{"ttl_ms":{TTL_MS},"poll_ms":10}}}}"#);
        Router::new(&FilterConfig::from_bytes(Some(json.as_bytes())).expect("valid")).expect("router")
    }

    fn worker(handle: u32) -> pb::WorkerEntry {
        pb::WorkerEntry {
            handle,
            worker_id: format!("w{handle}"),
            address: format!("127.0.0.1:{}", 9000 + handle),
            model: "m".into(),
            block_size: 4,
            tokenizer_id: "t1".into(),
            ..pb::WorkerEntry::default()
        }
    }

    fn assets() -> pb::ModelAssets {
        pb::ModelAssets {
            model: "m".into(),
            tokenizer_id: "t1".into(),
            block_size: 4,
            tokenizer: crate::router::tests::tokenizer_json().into_bytes(),
            tokenizer_config: Vec::new(),
            chat_template: "{% for m in messages %}{{ m.content }}{% endfor %}".into(),
        }
    }

    fn snapshot(workers: Vec<pb::WorkerEntry>) -> Body {
        Body::Snapshot(pb::Snapshot { workers, ..pb::Snapshot::default() })
    }

    const PROMPT: &[u8] = br#"{"model":"m","prompt":"a prompt of several four-byte blocks"}"#;

    #[test]
    fn nothing_heard_yet_is_503_not_404() {
        let mut router = router();
        assert!(router.routes_anything());
        let err = router.route(Endpoint::Completions, PROMPT, 0, 0).expect_err("no state");
        assert_eq!(err.kind, RejectKind::NotReady);
        assert_eq!(err.kind.status(), 503);
        assert!(err.kind.is_own_failure(), "the failure mode decides: answered or forwarded unrouted");
    }

    #[test]
    fn indexed_worker_wins_and_stale_state_falls_back_to_load() {
        let mut router = router();
        router.apply(&snapshot(vec![worker(1), worker(2), worker(3)]));
        router.load_assets(&assets()).expect("assets load");
        router.set_state_heard_at(Some(1_000));
        // The prompt's blocks as the engine's events name them, stored on worker 2.
        let mut hashes = Vec::new();
        let ids: Vec<u32> = PROMPT_TEXT.bytes().map(u32::from).collect();
        kvmesh_core::hash::hash_prompt(
            &ids,
            4,
            kvmesh_core::hash::BlockSalt::for_request(None, None),
            &mut hashes,
        );
        let index = vec![pb::IndexUpdate {
            handle: 2,
            stored: hashes.iter().map(|h| h.0).collect(),
            ..Default::default()
        }];
        router.apply(&Body::Delta(pb::Delta { index, ..pb::Delta::default() }));

        let routed = router.route(Endpoint::Completions, PROMPT, 1_500, 0).expect("routed");
        assert_eq!(routed.destination.split(',').next(), Some("127.0.0.1:9002"));
        assert_eq!(routed.overlap_blocks as usize, hashes.len());
        assert_eq!(routed.degraded, None);
        router.finish(&routed);

        // Nothing heard for longer than the TTL: load alone decides, and says so.
        let stale = router.route(Endpoint::Completions, PROMPT, 1_000 + TTL_MS + 1, 0).expect("routed");
        assert_eq!(stale.degraded, Some(Degraded::StaleState));
        assert_eq!(stale.overlap_blocks, 0);
    }

    /// The text of `PROMPT`, which the byte-per-token test tokenizer turns into one id per byte.
    const PROMPT_TEXT: &str = "a prompt of several four-byte blocks";

    /// The index update storing `PROMPT`'s blocks on the worker of `handle`.
    fn prompt_on(handle: u32) -> Vec<pb::IndexUpdate> {
        let mut hashes = Vec::new();
        let ids: Vec<u32> = PROMPT_TEXT.bytes().map(u32::from).collect();
        kvmesh_core::hash::hash_prompt(&ids, 4, kvmesh_core::hash::BlockSalt::NONE, &mut hashes);
        vec![pb::IndexUpdate { handle, stored: hashes.iter().map(|h| h.0).collect(), ..Default::default() }]
    }

    #[test]
    fn an_index_hashed_with_another_version_is_ignored_until_versions_match() {
        let mut router = router();
        let with_version = |version: u32| {
            Body::Snapshot(pb::Snapshot {
                workers: vec![worker(1), worker(2), worker(3)],
                index: prompt_on(2),
                block_hash_version: version,
                ..pb::Snapshot::default()
            })
        };
        router.load_assets(&assets()).expect("assets load");
        // Ours, then a control plane older than the field (0 means 1, the first version).
        for version in [BLOCK_HASH_VERSION, 0] {
            router.reset();
            router.apply(&with_version(version));
            router.set_state_heard_at(Some(1_000));
            assert_eq!(router.foreign_hash_version(), None);
            let routed = router.route(Endpoint::Completions, PROMPT, 1_000, 0).expect("routed");
            assert_eq!(routed.destination.split(',').next(), Some("127.0.0.1:9002"), "version {version}");
            assert!(routed.overlap_blocks > 0);
            router.finish(&routed);
        }
        // Another version: its hashes would match nothing here, so neither its snapshot's index
        // nor its deltas' are applied; workers, loads and routing go on.
        let theirs = BLOCK_HASH_VERSION + 1;
        router.reset();
        router.apply(&with_version(theirs));
        router.apply(&Body::Delta(pb::Delta { index: prompt_on(3), ..pb::Delta::default() }));
        assert_eq!(router.foreign_hash_version(), Some(theirs));
        assert_eq!(router.index.len(), 0);
        let routed = router.route(Endpoint::Completions, PROMPT, 1_000, 0).expect("routed");
        assert_eq!(routed.overlap_blocks, 0);
        assert_eq!(routed.degraded, None);
        router.finish(&routed);
        // Back to the same version: the index is used again.
        router.reset();
        router.apply(&with_version(BLOCK_HASH_VERSION));
        assert_eq!(router.foreign_hash_version(), None);
        assert!(!router.index.is_empty());
    }

    #[test]
    fn served_model_without_its_tokenizer_is_routed_on_load() {
        let mut router = router();
        router.apply(&snapshot(vec![worker(1)]));
        router.set_state_heard_at(Some(0));
        assert_eq!(router.models_wanted(), ["m"]);
        let routed = router.route(Endpoint::Completions, PROMPT, 10, 0).expect("routed");
        assert_eq!(routed.degraded, Some(Degraded::NoTokenizer));
        router.load_assets(&assets()).expect("assets load");
        assert!(router.models_wanted().is_empty());
    }

    #[test]
    fn a_thread_adopts_the_models_another_router_loaded() {
        let mut loaded = router();
        loaded.apply(&snapshot(vec![worker(1)]));
        let mut thread = router();
        thread.apply(&snapshot(vec![worker(1)]));
        thread.set_state_heard_at(Some(0));
        assert_eq!(thread.adopt_models(&loaded), 0, "nothing loaded yet");
        assert_eq!(thread.models_wanted(), ["m"]);
        loaded.load_assets(&assets()).expect("assets load");
        assert_eq!(thread.adopt_models(&loaded), 1);
        assert!(thread.models_wanted().is_empty());
        assert!(
            thread.models["m"].tokenizer.shares_with(&loaded.models["m"].tokenizer),
            "shared, not loaded again"
        );
        let routed = thread.route(Endpoint::Completions, PROMPT, 10, 0).expect("routed");
        assert_eq!(routed.degraded, None, "tokenized with the adopted model");
        assert_eq!(thread.adopt_models(&loaded), 0, "a model is adopted once");
    }

    #[test]
    fn removed_worker_gets_no_more_requests_and_reset_forgets_everything() {
        let mut router = router();
        router.apply(&snapshot(vec![worker(1), worker(2)]));
        router.load_assets(&assets()).expect("assets load");
        router.set_state_heard_at(Some(0));
        router.apply(&Body::Delta(pb::Delta { removed_workers: vec![1], ..pb::Delta::default() }));
        for i in 0..4 {
            let routed = router.route(Endpoint::Completions, PROMPT, i, 0).expect("routed");
            assert!(routed.destination.starts_with("127.0.0.1:9002"), "{routed:?}");
            router.finish(&routed);
        }
        router.reset();
        assert_eq!(router.worker_count(), 0);
    }

    #[test]
    fn policy_from_the_control_plane_applies_to_its_model() {
        let mut router = router();
        router.apply(&snapshot(vec![worker(1), worker(2)]));
        router.load_assets(&assets()).expect("assets load");
        router.set_state_heard_at(Some(0));
        let policies =
            vec![pb::PolicyUpdate { model: "m".into(), config_json: r#"{"policy":"round-robin"}"#.into() }];
        router.apply(&Body::Delta(pb::Delta { policies, ..pb::Delta::default() }));
        let routed = router.route(Endpoint::Completions, PROMPT, 1, 0).expect("routed");
        assert_eq!(routed.policy, kvmesh_core::PolicyKind::RoundRobin);
        // A malformed policy is logged and ignored: the previous one stays.
        let bad = vec![pb::PolicyUpdate { model: "m".into(), config_json: "{nope".into() }];
        router.apply(&Body::Delta(pb::Delta { policies: bad, ..pb::Delta::default() }));
        let routed = router.route(Endpoint::Completions, PROMPT, 2, 0).expect("routed");
        assert_eq!(routed.policy, kvmesh_core::PolicyKind::RoundRobin);
        // A newer control plane's setting this filter does not know is left out, not the policy.
        let newer = r#"{"policy":"load-only","a_later_setting":true,"approx":{"ttl_ms":1000,"later":1}}"#;
        let newer = vec![pb::PolicyUpdate { model: "m".into(), config_json: newer.into() }];
        router.apply(&Body::Delta(pb::Delta { policies: newer, ..pb::Delta::default() }));
        let routed = router.route(Endpoint::Completions, PROMPT, 3, 0).expect("routed");
        assert_eq!(routed.policy, kvmesh_core::PolicyKind::LoadOnly);
    }
}
