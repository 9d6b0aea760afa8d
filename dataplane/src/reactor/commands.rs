//! Commands from the control plane (`iscsictl`), taken from the control segment's command
//! ring by reactor 0 between its iterations and answered on the response ring.
//!
//! Records are JSON objects with an `op`; answers are JSON objects with `ok` and either the
//! result or an `error`. Every record is validated: malformed ones (the ring reports bad
//! generations and lengths; this module bad JSON, unknown ops, missing or wrong fields) get an
//! error answer and a warning in the log, and the dataplane goes on serving.
//!
//! Ops: `ping`, `targets` (the targets with their LUNs and mappings), `sessions` (the
//! registry: TSIH, initiator, ISID, target), `lun-resize` (a LUN's new size in bytes; done on
//! the reactor where the target's device lives, which answers back through reactor 0).

use super::shared::Msg;
use super::Reactor;
use crate::tgt::BdevKind;
use control::Incoming;
use serde_json::{json, Value};

/// Commands taken per reactor iteration (the rest wait for the next one).
const PER_ITERATION: usize = 4;

fn error(msg: impl std::fmt::Display) -> Value {
    json!({ "ok": false, "error": msg.to_string() })
}

impl Reactor {
    /// Takes and answers the control plane's commands (reactor 0).
    pub(super) fn poll_commands(&mut self) {
        let Some(seg) = self.env.shared.segment.as_ref() else {
            return;
        };
        let mut answers = Vec::new();
        let mut records = Vec::new();
        for _ in 0..PER_ITERATION {
            match seg.next_command(&mut self.cmd_next) {
                None => break,
                Some(Incoming::Bad { seq, why }) => {
                    log::warn!("control: bad command record {seq}: {why}");
                    answers.push((seq, error(format!("bad record: {why}"))));
                }
                Some(Incoming::Record { seq, record }) => records.push((seq, record)),
            }
        }
        for (seq, record) in records {
            if let Some(a) = self.execute(seq, &record) {
                answers.push((seq, a));
            }
        }
        for (seq, a) in answers {
            self.answer(seq, &a);
        }
    }

    /// Writes the answer to command `seq`.
    pub(super) fn answer(&self, seq: u64, answer: &Value) {
        if let Some(seg) = self.env.shared.segment.as_ref() {
            seg.respond(seq, answer.to_string().as_bytes());
        }
    }

    /// Runs one command; None when the answer comes later (from another reactor).
    fn execute(&mut self, seq: u64, record: &[u8]) -> Option<Value> {
        let req: Value = match serde_json::from_slice(record) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return Some(error("a command is a JSON object")),
            Err(e) => {
                log::warn!("control: command {seq} is not JSON: {e}");
                return Some(error(format!("not JSON: {e}")));
            }
        };
        let op = req["op"].as_str().unwrap_or("");
        log::debug!("control: command {seq}: {op}");
        match op {
            "ping" => Some(json!({ "ok": true, "pid": std::process::id() })),
            "targets" => Some(self.targets()),
            "sessions" => Some(self.sessions()),
            "lun-resize" => self.lun_resize(seq, &req),
            "" => Some(error("missing \"op\"")),
            other => {
                log::warn!("control: command {seq}: unknown op {other:?}");
                Some(error(format!("unknown op {other:?}")))
            }
        }
    }

    fn targets(&self) -> Value {
        let cfg = self.env.shared.model.config();
        let targets: Vec<Value> = cfg
            .targets
            .iter()
            .map(|t| {
                let luns: Vec<Value> = t
                    .luns
                    .iter()
                    .map(|l| {
                        let b = cfg.bdevs.iter().find(|b| b.name == l.bdev);
                        let kind = b.map(|b| match &b.kind {
                            BdevKind::Malloc { .. } => "malloc",
                            BdevKind::Null { .. } => "null",
                            BdevKind::File { .. } => "file",
                        });
                        json!({
                            "lun": l.lun,
                            "bdev": l.bdev,
                            "type": kind,
                            "block_size": b.map(|b| b.block_size),
                        })
                    })
                    .collect();
                let mappings: Vec<Value> = t
                    .mappings
                    .iter()
                    .map(|m| json!({ "portal_group": m.portal_group, "initiator_group": m.initiator_group }))
                    .collect();
                json!({
                    "name": t.name,
                    "alias": t.alias,
                    "queue_depth": t.queue_depth,
                    "luns": luns,
                    "mappings": mappings,
                })
            })
            .collect();
        json!({ "ok": true, "targets": targets })
    }

    fn sessions(&self) -> Value {
        let cfg = self.env.shared.model.config();
        // The registry lock is the login/logout lock: never taken per command.
        let list = self
            .env
            .shared
            .registry
            .lock()
            .map(|r| r.list())
            .unwrap_or_default();
        let sessions: Vec<Value> = list
            .into_iter()
            .map(|(tsih, key, conn)| {
                let isid: String = key.isid.iter().map(|b| format!("{b:02x}")).collect();
                json!({
                    "tsih": tsih,
                    "initiator": key.initiator,
                    "isid": isid,
                    "target": key.target.and_then(|t| cfg.targets.get(t)).map(|t| t.name.clone()),
                    "type": if key.target.is_some() { "normal" } else { "discovery" },
                    "connection": conn,
                })
            })
            .collect();
        json!({ "ok": true, "sessions": sessions })
    }

    fn lun_resize(&mut self, seq: u64, req: &Value) -> Option<Value> {
        let cfg = self.env.shared.model.config();
        let (Some(name), Some(lun), Some(size)) = (
            req["target"].as_str(),
            req["lun"].as_u64(),
            req["size"].as_u64(),
        ) else {
            return Some(error(
                "lun-resize needs \"target\", \"lun\" and \"size\" (bytes)",
            ));
        };
        let name = name.to_ascii_lowercase();
        let Some(target) = cfg.targets.iter().position(|t| t.name == name) else {
            return Some(error(format!("no target {name:?}")));
        };
        let Some(l) = cfg.targets[target].luns.iter().find(|l| l.lun == lun) else {
            return Some(error(format!("target {name:?} has no LUN {lun}")));
        };
        let bs = cfg
            .bdevs
            .iter()
            .find(|b| b.name == l.bdev)
            .map_or(512, |b| u64::from(b.block_size));
        if size == 0 || size % bs != 0 {
            return Some(error(format!(
                "size {size} is not a positive multiple of the block size {bs}"
            )));
        }
        let blocks = size / bs;
        let home = self.env.shared.home_of(target);
        if home == self.env.me {
            Some(resize_answer(
                self.env.resize_local(target, lun, blocks),
                lun,
                size,
            ))
        } else {
            let me = self.env.me;
            self.env.send(
                home,
                Msg::Resize {
                    target,
                    lun,
                    blocks,
                    seq,
                    reply_to: me,
                },
            );
            None
        }
    }
}

/// The answer to a resize, done here or on the device's reactor.
pub(super) fn resize_answer(result: Result<(), String>, lun: u64, size: u64) -> Value {
    match result {
        Ok(()) => json!({ "ok": true, "lun": lun, "size": size }),
        Err(e) => error(format!("resize failed: {e}")),
    }
}
