//! nats-server as a test child.

use std::process::Command;

use crate::{Process, READY_TIMEOUT, free_port, nats_server_binary, tcp_accepts};

/// A running nats-server on a free 127.0.0.1 port; stopped on drop.
pub struct NatsServer {
    /// The process; public so tests can read its log.
    pub process: Process,
    port: u16,
}

impl NatsServer {
    /// Starts nats-server and waits until it accepts client connections.
    pub fn start() -> NatsServer {
        let port = free_port();
        let mut cmd = Command::new(nats_server_binary());
        cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        let mut process = Process::spawn("nats-server", cmd);
        process.wait_ready(&format!("client port {port} accepts"), READY_TIMEOUT, || tcp_accepts(port));
        NatsServer { process, port }
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client URL (`nats://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}
