//! Commands from the control plane (`iscsictl`), taken from the control segment's command
//! ring by reactor 0 between its iterations and answered on the response ring.
//!
//! Records are JSON objects with an `op`; answers are JSON objects with `ok` and either the
//! result or an `error`. Every record is validated: malformed ones (the ring reports bad
//! generations and lengths; this module bad JSON, unknown ops, missing or wrong fields) get an
//! error answer and a warning in the log, and the dataplane goes on serving.
//!
//! Ops: `ping`, `targets` (the targets with their LUNs and mappings), `sessions` (the
//! registry: TSIH, initiator, ISID, target), `connections` (gathered from every reactor;
//! parked ones only counted), `lun-resize` (a LUN's new size in bytes; done on
//! the reactor where the target's device lives, which answers back through reactor 0),
//! `target-add` (a target with new bdevs for its LUNs, mapped to existing portal and
//! initiator groups: the device is built here and installed on its home reactor, which then
//! hands every reactor the new model and answers), `target-del` (every reactor closes the
//! target's connections when it gets the new model; the home reactor drops the device once
//! its commands in flight have finished).

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
            "connections" => self.connections(seq),
            "lun-resize" => self.lun_resize(seq, &req),
            "target-add" => self.target_add(seq, &req),
            "target-del" => Some(self.target_del(&req)),
            "config" => Some(json!({
                "ok": true,
                "toml": crate::tgt::save::to_toml(&self.env.model.current_config()),
            })),
            "" => Some(error("missing \"op\"")),
            other => {
                log::warn!("control: command {seq}: unknown op {other:?}");
                Some(error(format!("unknown op {other:?}")))
            }
        }
    }

    fn targets(&self) -> Value {
        let cfg = self.env.model.config();
        let targets: Vec<Value> = self
            .env
            .model
            .live_targets()
            .map(|(_, t)| {
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
        let cfg = self.env.model.config();
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
                    "target": key
                        .target
                        .filter(|t| self.env.model.is_live(*t))
                        .and_then(|t| cfg.targets.get(t))
                        .map(|t| t.name.clone()),
                    "type": if key.target.is_some() { "normal" } else { "discovery" },
                    "connection": conn,
                })
            })
            .collect();
        json!({ "ok": true, "sessions": sessions })
    }

    fn lun_resize(&mut self, seq: u64, req: &Value) -> Option<Value> {
        let cfg = self.env.model.config();
        let (Some(name), Some(lun), Some(size)) = (
            req["target"].as_str(),
            req["lun"].as_u64(),
            req["size"].as_u64(),
        ) else {
            return Some(error(
                "lun-resize needs \"target\", \"lun\" and \"size\" (bytes)",
            ));
        };
        let Some((target, _)) = self.env.model.find_target(name) else {
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

impl Reactor {
    /// Asks every reactor for its connections; the answer goes out when all have replied.
    fn connections(&mut self, seq: u64) -> Option<Value> {
        let n = self.env.shared.mailboxes.len();
        let mine = self.connection_list(std::time::Instant::now());
        self.gathering.insert(seq, (n - 1, mine));
        for to in 1..n {
            self.env.send(to, Msg::ListConnections { seq });
        }
        if n == 1 {
            self.gathered(seq, Vec::new());
        }
        None
    }

    /// This reactor's connections, one JSON object each.
    pub(super) fn connection_list(&self, now: std::time::Instant) -> Vec<String> {
        let model = &self.env.model;
        self.conns
            .values()
            .map(|e| {
                let (peer, local, initiator, phase, tasks) = e.conn.describe();
                let target = e
                    .conn
                    .target()
                    .and_then(|t| model.config().targets.get(t))
                    .map(|t| t.name.clone());
                json!({
                    "id": e.conn.uid(),
                    "reactor": self.env.me,
                    "transport": match e.link {
                        super::Link::Kernel(_) => "kernel",
                        super::Link::User(_) => "userspace",
                    },
                    "peer": peer.to_string(),
                    "local": local.to_string(),
                    "initiator": initiator,
                    "target": target,
                    "tsih": e.conn.tsih(),
                    "phase": phase,
                    "commands": tasks,
                    "idle_ms": now.saturating_duration_since(e.conn.last_rx()).as_millis() as u64,
                })
                .to_string()
            })
            .collect()
    }

    /// One reactor's part of a `connections` answer arrived.
    pub(super) fn gathered(&mut self, seq: u64, list: Vec<String>) {
        let Some((left, rows)) = self.gathering.get_mut(&seq) else {
            return;
        };
        rows.extend(list);
        if *left > 0 {
            *left -= 1;
        }
        if *left > 0 {
            return;
        }
        let Some((_, rows)) = self.gathering.remove(&seq) else {
            return;
        };
        let list: Vec<Value> = rows
            .iter()
            .filter_map(|r| serde_json::from_str(r).ok())
            .collect();
        let shared = &self.env.shared;
        let parked = shared
            .parked_total
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(
                shared
                    .woken_total
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
        self.answer(
            seq,
            &json!({ "ok": true, "connections": list, "parked": parked }),
        );
    }

    fn target_add(&mut self, seq: u64, req: &Value) -> Option<Value> {
        let (node, bdevs) = match new_target(&self.env.model, req) {
            Ok(x) => x,
            Err(e) => return Some(error(e)),
        };
        let mut opened = std::collections::HashMap::new();
        for b in &bdevs {
            match crate::tgt::live::open_bdev(b) {
                Ok(dev) => {
                    opened.insert(b.name.clone(), dev);
                }
                Err(e) => return Some(error(format!("bdev {}: {e}", b.name))),
            }
        }
        let device = match crate::tgt::live::build_device(&node, &mut opened) {
            Ok(d) => d,
            Err(e) => return Some(error(e)),
        };
        let (model, id) = self.env.model.with_target(node, bdevs);
        let model = std::sync::Arc::new(model);
        // Reactor 0 takes the model at once, so the next command builds on it; the home
        // reactor installs the device, then gives the model to the others and answers.
        self.env.adopt_model(model.clone());
        let home = self.env.shared.home_of(id);
        self.env.send(
            home,
            Msg::AddDevice {
                target: id,
                device: Box::new(device),
                model,
                seq,
            },
        );
        None
    }

    fn target_del(&mut self, req: &Value) -> Value {
        let Some(name) = req["target"].as_str() else {
            return error("target-del needs \"target\"");
        };
        let Some((id, node)) = self.env.model.find_target(name) else {
            return error(format!("no target {name:?}"));
        };
        let name = node.name.clone();
        let model = std::sync::Arc::new(self.env.model.without_target(id));
        self.env.adopt_model(model.clone());
        self.close_removed_targets();
        for to in 0..self.env.shared.mailboxes.len() {
            if to != self.env.me {
                self.env.send(to, Msg::Model(model.clone()));
            }
        }
        let home = self.env.shared.home_of(id);
        self.env.send(home, Msg::RemoveDevice(id));
        log::info!("control: target {name} removed (id {id})");
        json!({ "ok": true, "target": name })
    }
}

/// Validates a `target-add` request against the current model: the target (name, alias,
/// queue depth, mappings to existing groups) and one new bdev per LUN.
fn new_target(
    model: &crate::tgt::live::Model,
    req: &Value,
) -> Result<(crate::tgt::TargetNode, Vec<crate::tgt::BdevConfig>), String> {
    use crate::tgt::{config, BdevConfig, FileEngine, LunMapping, PortGroupMapping, TargetNode};
    let cfg = model.config();
    let name = req["name"].as_str().ok_or("target-add needs \"name\"")?;
    let name = config::check_iscsi_name(name)?;
    if model.find_target(&name).is_some() {
        return Err(format!("target {name:?} exists"));
    }
    let alias = req["alias"].as_str().map(str::to_string);
    let queue_depth = match req.get("queue_depth") {
        None | Some(Value::Null) => 128,
        Some(v) => v
            .as_u64()
            .filter(|q| (1..=4096).contains(q))
            .ok_or("queue_depth must be 1..=4096")? as u32,
    };
    let pg = req["portal_group"]
        .as_u64()
        .ok_or("target-add needs \"portal_group\"")?;
    let ig = req["initiator_group"]
        .as_u64()
        .ok_or("target-add needs \"initiator_group\"")?;
    if !cfg.portal_groups.iter().any(|p| u64::from(p.tag) == pg) {
        return Err(format!("no portal group with tag {pg}"));
    }
    if !cfg.initiator_groups.iter().any(|g| u64::from(g.tag) == ig) {
        return Err(format!("no initiator group with tag {ig}"));
    }
    let luns = req["luns"].as_array().ok_or("target-add needs \"luns\"")?;
    if luns.is_empty() || luns.len() > 256 {
        return Err("a target needs 1 to 256 LUNs".into());
    }
    let mut maps = Vec::new();
    let mut bdevs = Vec::new();
    for l in luns {
        let lun = l["lun"]
            .as_u64()
            .filter(|n| *n <= 16383)
            .ok_or("each LUN needs \"lun\" 0..=16383")?;
        if maps.iter().any(|m: &LunMapping| m.lun == lun) {
            return Err(format!("LUN {lun} given twice"));
        }
        let block_size = match l.get("block_size") {
            None | Some(Value::Null) => 512,
            Some(v) => match v.as_u64() {
                Some(512) => 512,
                Some(4096) => 4096,
                _ => return Err(format!("LUN {lun}: block_size must be 512 or 4096")),
            },
        };
        let size = l["size"].as_u64();
        if let Some(s) = size {
            if s == 0 || s % u64::from(block_size) != 0 {
                return Err(format!(
                    "LUN {lun}: size {s} is not a positive multiple of {block_size}"
                ));
            }
        }
        let kind = match l["type"].as_str().unwrap_or("malloc") {
            "malloc" => crate::tgt::BdevKind::Malloc {
                size: size.ok_or(format!("LUN {lun}: a malloc bdev needs a size"))?,
            },
            "null" => crate::tgt::BdevKind::Null {
                size: size.ok_or(format!("LUN {lun}: a null bdev needs a size"))?,
            },
            "file" => crate::tgt::BdevKind::File {
                path: l["path"]
                    .as_str()
                    .ok_or(format!("LUN {lun}: a file bdev needs a path"))?
                    .into(),
                size,
                engine: FileEngine::Uring,
                direct: true,
            },
            other => return Err(format!("LUN {lun}: unknown bdev type {other:?}")),
        };
        let bdev = format!("{name}/lun{lun}");
        if cfg.bdevs.iter().any(|b| b.name == bdev) {
            return Err(format!("bdev {bdev:?} exists"));
        }
        maps.push(LunMapping {
            lun,
            bdev: bdev.clone(),
        });
        bdevs.push(BdevConfig {
            name: bdev,
            block_size,
            kind,
        });
    }
    let node = TargetNode {
        name,
        alias,
        luns: maps,
        mappings: vec![PortGroupMapping {
            portal_group: pg as u16,
            initiator_group: ig as u16,
        }],
        queue_depth,
    };
    Ok((node, bdevs))
}

/// The answer to a resize, done here or on the device's reactor.
pub(super) fn resize_answer(result: Result<(), String>, lun: u64, size: u64) -> Value {
    match result {
        Ok(()) => json!({ "ok": true, "lun": lun, "size": size }),
        Err(e) => error(format!("resize failed: {e}")),
    }
}
