//! nats-server starts from the harness and speaks the NATS client protocol.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use kvmesh_tests::nats::NatsServer;

#[test]
fn nats_server_answers_ping_with_pong() {
    let nats = NatsServer::start();
    let stream = TcpStream::connect(("127.0.0.1", nats.port())).expect("connect to nats-server");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("set read timeout");
    let mut writer = stream.try_clone().expect("clone the client stream");
    let mut reader = BufReader::new(stream);

    // The server speaks first: `INFO {json}\r\n`.
    let mut info = String::new();
    reader.read_line(&mut info).expect("read INFO");
    assert!(info.starts_with("INFO {"), "expected INFO, got {info:?}");

    writer.write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n").expect("send CONNECT and PING");
    let mut reply = String::new();
    reader.read_line(&mut reply).expect("read the reply to PING");
    assert_eq!(reply, "PONG\r\n", "nats-server log:\n{}", nats.process.log_text());
}
