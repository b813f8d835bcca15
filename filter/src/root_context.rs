//! The root context: one per plugin per VM. Its configuration picks the role: the HTTP filter
//! (loads static models and workers, follows the relayed control-plane state on a timer, makes HTTP
//! contexts) or the state service (holds the stream; see `service.rs`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use kvmesh_proto::v1 as pb;
use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::accuracy::AccuracyMetrics;
use crate::config::FilterConfig;
use crate::flow::Settings;
use crate::http_context::{KvmeshHttp, ProxyWasmStats, VmState};
use crate::metrics::Metrics;
use crate::relay::{Follower, SharedStore, assets_key};
use crate::router::Router;
use crate::service::{HostStore, StateService, TICK};

/// What this root context is.
enum Role {
    /// Not configured yet (or the configuration failed).
    Unconfigured,
    /// The HTTP filter of one VM.
    Http(Rc<VmState>),
    /// The state service.
    Service(Box<StateService>),
}

/// Root context of the kvmesh module.
pub(crate) struct KvmeshRoot {
    role: Role,
    /// The HTTP filter's reader of the relayed state (`None` without `state` in the config).
    follower: Option<Follower>,
    /// Assets generation at which each wanted model was last tried, so a failing load is not
    /// retried every tick but again when new files arrive.
    tried: HashMap<String, u64>,
    assets_generation: u64,
}

impl Default for KvmeshRoot {
    fn default() -> Self {
        KvmeshRoot { role: Role::Unconfigured, follower: None, tried: HashMap::new(), assets_generation: 0 }
    }
}

/// Milliseconds on the host's clock (0 if it refuses).
fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// Microseconds on the host's clock (0 if it refuses).
fn now_micros() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_micros() as u64)
}

impl KvmeshRoot {
    /// The HTTP filter's timer: apply what the state service relayed, then load at most one newly
    /// available model (a load takes seconds in V8 and blocks this thread meanwhile).
    fn follow_state(&mut self, state: &VmState) {
        let Some(follower) = &mut self.follower else { return };
        let Ok(mut router) = state.router.try_borrow_mut() else { return };
        let started = now_micros();
        let polled = follower.poll(&HostStore, &mut *router);
        router.set_state_heard_at(follower.heard_at_ms());
        state.metrics.state_polled(&polled, now_micros().saturating_sub(started));
        if polled.snapshot {
            state.metrics.state_hash_version(router.foreign_hash_version());
        }
        if polled.assets_changed {
            self.assets_generation += 1;
        }
        let generation = self.assets_generation;
        let Some(model) = router.models_wanted().into_iter().find(|m| self.tried.get(m) != Some(&generation))
        else {
            return;
        };
        self.tried.insert(model.clone(), generation);
        let Some(bytes) = HostStore.get(&assets_key(&model)) else { return };
        let started = now_ms();
        let loaded = pb::ModelAssets::decode(bytes.as_slice())
            .map_err(|e| e.to_string())
            .and_then(|assets| router.load_assets(&assets).map_err(|e| e.to_string()));
        match loaded {
            Ok(()) => {
                state.metrics.model_loaded(true);
                log::info!("kvmesh filter: model {model} loaded in {} ms", now_ms().saturating_sub(started));
            }
            Err(err) => {
                state.metrics.model_loaded(false);
                log::error!("kvmesh filter: model {model} not loaded: {err}");
            }
        }
    }
}

impl Context for KvmeshRoot {
    fn on_grpc_stream_message(&mut self, token_id: u32, message_size: usize) {
        if let Role::Service(service) = &mut self.role {
            service.on_stream_message(token_id, message_size, now_ms());
        }
    }

    fn on_grpc_stream_close(&mut self, token_id: u32, status_code: u32) {
        if let Role::Service(service) = &mut self.role {
            service.on_stream_close(token_id, status_code, now_ms());
        }
    }

    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        if let Role::Service(service) = &mut self.role {
            service.on_call_response(token_id, status_code, response_size, now_ms());
        }
    }
}

impl RootContext for KvmeshRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let started = now_ms();
        let raw = self.get_plugin_configuration();
        let config = match FilterConfig::from_bytes(raw.as_deref()) {
            Ok(config) => config,
            Err(err) => {
                // Returning false fails the plugin load; Envoy logs it and (fail closed) refuses to start.
                log::error!("{err}");
                return false;
            }
        };
        if let Some(control_plane) = config.control_plane {
            let Some(cluster) = control_plane.cluster.clone() else {
                log::error!(
                    "kvmesh filter: `control_plane.address` is the native module's; the Wasm module \
                     reaches the control plane through an Envoy cluster (`control_plane.cluster`)"
                );
                return false;
            };
            log::info!("kvmesh filter {}: state service for cluster {cluster}", crate::FILTER_VERSION);
            self.role = Role::Service(Box::new(StateService::new(control_plane, cluster)));
            if let Err(status) = hostcalls::set_tick_period(TICK) {
                log::error!("kvmesh filter: cannot set the state service's timer: {status:?}");
                return false;
            }
            return true;
        }
        match Router::new(&config) {
            Ok(router) => {
                log::info!(
                    "kvmesh filter {} configured: {} static models, {} static workers{}, loaded in {} ms",
                    crate::FILTER_VERSION,
                    router.model_count(),
                    router.worker_count(),
                    if config.state.is_some() { ", following the control plane's state" } else { "" },
                    now_ms().saturating_sub(started)
                );
                let metrics = Metrics::define(ProxyWasmStats);
                metrics.model_loaded_n(router.model_count());
                // A reconfigured plugin starts over: state of the old configuration is dropped.
                let accuracy = AccuracyMetrics::define(ProxyWasmStats);
                self.role = Role::Http(Rc::new(VmState {
                    router: RefCell::new(router),
                    metrics,
                    accuracy,
                    settings: Settings::new(&config),
                }));
                self.tried.clear();
                self.follower = None;
                if let Some(state) = config.state {
                    self.follower = Some(Follower::default());
                    if let Err(status) = hostcalls::set_tick_period(Duration::from_millis(state.poll_ms)) {
                        log::error!("kvmesh filter: cannot set the state timer: {status:?}");
                        return false;
                    }
                    // Whatever the state service relayed before this VM started is applied now.
                    if let Role::Http(state) = &self.role {
                        let state = Rc::clone(state);
                        self.follow_state(&state);
                    }
                }
                true
            }
            Err(err) => {
                log::error!("{err}");
                false
            }
        }
    }

    fn on_tick(&mut self) {
        match &mut self.role {
            Role::Service(service) => service.on_tick(now_ms()),
            Role::Http(state) => {
                let state = Rc::clone(state);
                self.follow_state(&state);
            }
            Role::Unconfigured => {}
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Before a successful configure, or in the state service, there is nothing to route with:
        // Envoy then runs no filter.
        let Role::Http(state) = &self.role else { return None };
        Some(Box::new(KvmeshHttp::new(context_id, Rc::clone(state))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
