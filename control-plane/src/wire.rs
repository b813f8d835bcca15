//! The wire edge of the control plane: NATS subjects, and the wire enums' conversions to core's
//! domain types (shared with the filter in `kvmesh_proto::convert`), so the rest of the crate speaks
//! `Role`, `Engine`, `WorkerState`.

pub use kvmesh_proto::convert::{
    engine_from_wire, engine_to_wire, role_from_wire, role_to_wire, state_to_wire,
};

/// Which NATS subject a message came on, by its kind token.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SubjectKind {
    /// `kvmesh.<ns>.kv.<worker>`: a KvEventBatch.
    Kv,
    /// `kvmesh.<ns>.load.<worker>`: a LoadReport.
    Load,
    /// `kvmesh.<ns>.worker.<worker>`: a Heartbeat.
    Worker,
    /// `kvmesh.<ns>.resync.*`: a resync request (another replica's, or our own echo).
    Resync,
}

impl SubjectKind {
    /// Label used in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            SubjectKind::Kv => "kv",
            SubjectKind::Load => "load",
            SubjectKind::Worker => "worker",
            SubjectKind::Resync => "resync",
        }
    }
}

/// The subjects of one namespace.
#[derive(Clone, Debug)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// Subjects under `kvmesh.<namespace>.`.
    pub fn new(namespace: &str) -> Self {
        Subjects { prefix: format!("kvmesh.{namespace}.") }
    }

    /// The wildcard covering every subject of the namespace.
    pub fn all(&self) -> String {
        format!("{}>", self.prefix)
    }

    /// Where a worker's resync requests go.
    pub fn resync(&self, worker: &str) -> String {
        format!("{}resync.{worker}", self.prefix)
    }

    /// Where the every-agent resync request goes.
    pub fn resync_all(&self) -> String {
        format!("{}resync.all", self.prefix)
    }

    /// A worker's KV event subject.
    pub fn kv(&self, worker: &str) -> String {
        format!("{}kv.{worker}", self.prefix)
    }

    /// A worker's load subject.
    pub fn load(&self, worker: &str) -> String {
        format!("{}load.{worker}", self.prefix)
    }

    /// A worker's heartbeat subject.
    pub fn worker(&self, worker: &str) -> String {
        format!("{}worker.{worker}", self.prefix)
    }

    /// The kind of a subject of this namespace; `None` for one this control plane does not read.
    pub fn kind(&self, subject: &str) -> Option<SubjectKind> {
        let rest = subject.strip_prefix(&self.prefix)?;
        let (kind, worker) = rest.split_once('.')?;
        if worker.is_empty() {
            return None;
        }
        match kind {
            "kv" => Some(SubjectKind::Kv),
            "load" => Some(SubjectKind::Load),
            "worker" => Some(SubjectKind::Worker),
            "resync" => Some(SubjectKind::Resync),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let s = Subjects::new("prod");
        assert_eq!(s.kind(&s.kv("w-1")), Some(SubjectKind::Kv));
        assert_eq!(s.kind(&s.load("w-1")), Some(SubjectKind::Load));
        assert_eq!(s.kind(&s.worker("w.1")), Some(SubjectKind::Worker));
        assert_eq!(s.kind(&s.resync_all()), Some(SubjectKind::Resync));
        assert_eq!(s.kind("kvmesh.other.kv.w"), None);
        assert_eq!(s.kind("kvmesh.prod.kv."), None);
        assert_eq!(s.kind("kvmesh.prod.planner.x"), None);
        assert_eq!(s.all(), "kvmesh.prod.>");
    }
}
