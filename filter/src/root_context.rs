//! The root context: one per plugin per VM; loads the configuration, the models' tokenizers and the
//! fleet once per VM, and makes HTTP contexts over that shared state.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use crate::config::FilterConfig;
use crate::http_context::{KvmeshHttp, VmState};
use crate::metrics::Metrics;
use crate::router::Router;

/// Root context of the kvmesh filter.
#[derive(Default)]
pub(crate) struct KvmeshRoot {
    /// Shared with every HTTP context of this VM; `None` until configured.
    state: Option<Rc<VmState>>,
}

impl Context for KvmeshRoot {}

/// Milliseconds on the host's clock (0 if it refuses: only the load-time log line suffers).
fn now_ms() -> u128 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis())
}

impl RootContext for KvmeshRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let started = now_ms();
        let raw = self.get_plugin_configuration();
        let router = FilterConfig::from_bytes(raw.as_deref()).and_then(|config| Router::new(&config));
        match router {
            Ok(router) => {
                log::info!(
                    "kvmesh filter {} configured: {} models, {} workers, loaded in {} ms",
                    crate::FILTER_VERSION,
                    router.model_count(),
                    router.worker_count(),
                    now_ms().saturating_sub(started)
                );
                // A reconfigured plugin starts over: state of the old configuration is dropped.
                self.state =
                    Some(Rc::new(VmState { router: RefCell::new(router), metrics: Metrics::define() }));
                true
            }
            Err(err) => {
                // Returning false fails the plugin load; Envoy logs it and (fail closed) refuses to start.
                log::error!("{err}");
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Before a successful configure there is nothing to route with: Envoy then runs no filter.
        let state = self.state.as_ref()?;
        Some(Box::new(KvmeshHttp::new(context_id, Rc::clone(state))))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
