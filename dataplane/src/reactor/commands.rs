//! Commands from the control plane (`iscsictl`), taken from the control segment's command
//! ring by reactor 0 between its iterations and answered on the response ring.
//!
//! Records are JSON objects with an `op`; answers are JSON objects with `ok` and either the
//! result or an `error`. Every record is validated: malformed ones (the ring reports bad
//! generations and lengths; this module bad JSON, unknown ops, missing or wrong fields) get an
//! error answer and a warning in the log, and the dataplane goes on serving.
//!
//! Read ops: `ping`, `targets` (targets with their LUNs and mappings), `bdevs`, `sessions`
//! (the registry), `connections` (gathered from every reactor; parked ones only counted),
//! `config` (the running configuration as TOML).
//!
//! Changing ops (`target-add`, `target-del`, `lun-add`, `lun-del`, `lun-resize`,
//! `bdev-add`, `bdev-del`, `pg-add`, `pg-del`, `ig-add`, `ig-del`, `apply`) all work the
//! same way: the running configuration with the edit made (or the file `apply` carries) is
//! validated like a configuration file, [`live::plan`] works out the difference, and
//! [`Reactor::change`] carries it out in two steps. First everything that can fail is done
//! on reactor 0 (bdevs opened, portals bound): a failure there changes nothing. Then the
//! home reactors install the new LUNs (a new target's device with its first), and only
//! when all have answered does every reactor get the new model; each then retires the LUNs
//! and devices the model no longer has (after their commands in flight) and ends the
//! sessions it no longer carries (Async Message, then close). Removed LUNs' bdevs come back
//! to reactor 0, which keeps them open while the model defines them (`--keep-bdev`, `bdev
//! add`) and closes the others. `dry_run` answers with the changes without making them.

use super::shared::{LunWork, Msg};
use super::Reactor;
use crate::iscsi::TargetId;
use crate::tgt::live::{self, Model};
use crate::tgt::{
    config, save, BdevConfig, BdevKind, Config, FileEngine, LunMapping, PortGroupMapping,
    TargetNode,
};
use control::Incoming;
use mio::{Interest, Token};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Commands taken per reactor iteration (the rest wait for the next one).
const PER_ITERATION: usize = 4;

fn error(msg: impl std::fmt::Display) -> Value {
    json!({ "ok": false, "error": msg.to_string() })
}

impl Reactor {
    /// Takes and answers the control plane's commands (reactor 0).
    pub(super) fn poll_commands(&mut self) {
        if self
            .change
            .as_ref()
            .is_some_and(|c| std::time::Instant::now() > c.deadline)
        {
            if let Some(c) = self.change.take() {
                log::error!(
                    "control: change {} abandoned: a reactor did not answer",
                    c.seq
                );
                self.answer(
                    c.seq,
                    &error("a reactor did not install its part in time; nothing was changed"),
                );
            }
        }
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
            "bdevs" => Some(self.bdevs()),
            "sessions" => Some(self.sessions()),
            "connections" => self.connections(seq),
            "target-add" | "target-del" | "lun-add" | "lun-del" | "lun-resize" | "bdev-add"
            | "bdev-del" | "pg-add" | "pg-del" | "ig-add" | "ig-del" | "apply" => {
                let dry_run = req["dry_run"].as_bool().unwrap_or(false);
                match edit(&self.env.model, op, &req) {
                    Ok(desired) => self.change(seq, desired, dry_run),
                    Err(e) => Some(error(e)),
                }
            }
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

    fn bdevs(&self) -> Value {
        let m = &self.env.model;
        let list: Vec<Value> = m
            .config()
            .bdevs
            .iter()
            .map(|b| {
                let (kind, size, path) = match &b.kind {
                    BdevKind::Malloc { size } => ("malloc", Some(*size), None),
                    BdevKind::Null { size } => ("null", Some(*size), None),
                    BdevKind::File { path, size, .. } => {
                        ("file", *size, Some(path.display().to_string()))
                    }
                };
                let used_by = m.live_targets().find_map(|(_, t)| {
                    t.luns
                        .iter()
                        .find(|l| l.bdev == b.name)
                        .map(|l| format!("{} LUN {}", t.name, l.lun))
                });
                json!({
                    "name": b.name,
                    "type": kind,
                    "size": size,
                    "block_size": b.block_size,
                    "path": path,
                    "used_by": used_by,
                    "open": used_by.is_some() || self.env.pool.contains_key(&b.name),
                })
            })
            .collect();
        json!({ "ok": true, "bdevs": list })
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
}

/// One home reactor's part of a change: LUNs to install, LUNs to resize (target, LUN,
/// blocks).
type HomeWork = (Vec<LunWork>, Vec<(TargetId, u64, u64)>);

/// A configuration change waiting for its home reactors (reactor 0 holds one at a time).
pub(super) struct PendingChange {
    seq: u64,
    model: Arc<Model>,
    /// Home reactors that have not answered yet.
    left: usize,
    changes: Vec<String>,
    restart: Vec<String>,
    errors: Vec<String>,
    /// A home that has not answered by then is not coming (a reactor stopped): the change
    /// is abandoned, and LUNs installed for it retire with the next model.
    deadline: std::time::Instant,
}

/// How long the home reactors get to install a change's LUNs.
const PREPARE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Reactor {
    /// Brings the running model to `desired`: works out the difference, does everything
    /// that can fail first (opening bdevs, binding portals) so a failure changes nothing,
    /// has the home reactors install new LUNs, then hands every reactor the new model, on
    /// which they drop what it no longer has. Answers when the homes have done their part.
    fn change(&mut self, seq: u64, desired: Config, dry_run: bool) -> Option<Value> {
        if self.change.is_some() {
            return Some(error("another change is in progress; try again"));
        }
        let plan = match live::plan(&self.env.model, &desired) {
            Ok(p) => p,
            Err(e) => return Some(error(e)),
        };
        if dry_run || plan.is_empty() {
            return Some(json!({
                "ok": true,
                "applied": false,
                "changes": plan.changes,
                "restart": plan.restart,
            }));
        }
        let reopened = |n: &str| plan.open.iter().any(|b| b.name == n);
        for l in &plan.luns {
            if !reopened(&l.bdev) && !self.env.pool.contains_key(&l.bdev) {
                return Some(error(format!(
                    "bdev {} is still held by a removed LUN finishing its commands; try again",
                    l.bdev
                )));
            }
        }
        let mut opened = HashMap::new();
        for b in &plan.open {
            match live::open_bdev(b) {
                Ok(d) => {
                    opened.insert(b.name.clone(), d);
                }
                Err(e) => return Some(error(e)),
            }
        }
        let mut listeners = Vec::new();
        for (addr, tag) in &plan.portals_add {
            match crate::net::tcp::listen(*addr) {
                Ok(l) => listeners.push((l, *tag)),
                Err(e) => return Some(error(format!("cannot listen on {addr}: {e}"))),
            }
        }
        // Nothing below fails the change as a whole.
        let mut errors = Vec::new();
        let n = self.env.shared.mailboxes.len();
        let mut work: Vec<HomeWork> = (0..n).map(|_| (Vec::new(), Vec::new())).collect();
        let mapped = |name: &str| {
            plan.model
                .live_targets()
                .any(|(_, t)| t.luns.iter().any(|l| l.bdev == name))
        };
        for (name, _) in &plan.resize {
            if !self.env.pool.contains_key(name) && !mapped(name) {
                return Some(error(format!(
                    "bdev {name} is still held by a removed LUN finishing its commands; try again"
                )));
            }
        }
        for (name, blocks) in &plan.resize {
            if let Some(b) = self.env.pool.get_mut(name) {
                if let Err(e) = b.resize(*blocks) {
                    errors.push(format!("bdev {name}: resize failed: {e}"));
                }
                continue;
            }
            let user = plan
                .model
                .live_targets()
                .find_map(|(id, t)| t.luns.iter().find(|l| &l.bdev == name).map(|l| (id, l.lun)));
            match user {
                Some((t, lun)) => work[self.env.shared.home_of(t)].1.push((t, lun, *blocks)),
                None => errors.push(format!("bdev {name}: busy, not resized")),
            }
        }
        for l in plan.luns {
            let Some(bdev) = opened
                .remove(&l.bdev)
                .or_else(|| self.env.pool.remove(&l.bdev))
            else {
                errors.push(format!("bdev {}: not open", l.bdev));
                continue;
            };
            work[self.env.shared.home_of(l.target)].0.push(LunWork {
                target: l.target,
                lun: l.lun,
                bdev,
                identity: l.identity,
                replace: l.replace,
            });
        }
        // New bdevs no LUN uses wait in the pool; undefined ones close.
        self.env.pool.extend(opened);
        let defined: Vec<&str> = plan
            .model
            .config()
            .bdevs
            .iter()
            .map(|b| b.name.as_str())
            .collect();
        self.env.pool.retain(|n, _| {
            let keep = defined.contains(&n.as_str());
            if !keep {
                log::info!("control: bdev {n} closed");
            }
            keep
        });
        self.change_portals(listeners, &plan.portals_del, &plan.portals_retag);
        let mut left = 0;
        for (home, (luns, resize)) in work.into_iter().enumerate() {
            if !luns.is_empty() || !resize.is_empty() {
                self.env.send(home, Msg::Prepare { seq, luns, resize });
                left += 1;
            }
        }
        self.change = Some(PendingChange {
            seq,
            model: Arc::new(plan.model),
            left,
            changes: plan.changes,
            restart: plan.restart,
            errors,
            deadline: std::time::Instant::now() + PREPARE_TIMEOUT,
        });
        if left == 0 {
            self.commit();
        }
        None
    }

    /// A home reactor has done its part of the pending change.
    pub(super) fn prepared(&mut self, seq: u64, errors: Vec<String>) {
        let Some(c) = self.change.as_mut().filter(|c| c.seq == seq) else {
            return;
        };
        c.errors.extend(errors);
        c.left = c.left.saturating_sub(1);
        if c.left == 0 {
            self.commit();
        }
    }

    /// Every home is ready: the new model goes to every reactor, and the answer out.
    fn commit(&mut self) {
        let Some(c) = self.change.take() else {
            return;
        };
        let level = &c.model.global().log_level;
        if *level != self.env.model.global().log_level {
            if let Some(l) = crate::logger::parse_level(level) {
                log::set_max_level(l);
            }
        }
        self.env.adopt_model(c.model.clone());
        self.end_unmapped_sessions();
        for to in 0..self.env.shared.mailboxes.len() {
            if to != self.env.me {
                self.env.send(to, Msg::Model(c.model.clone()));
            }
        }
        for line in &c.changes {
            log::info!("control: {line}");
        }
        for e in &c.errors {
            log::error!("control: {e}");
        }
        let answer = json!({
            "ok": c.errors.is_empty(),
            "applied": true,
            "changes": c.changes,
            "restart": c.restart,
            "errors": c.errors,
            "error": (!c.errors.is_empty()).then(|| c.errors.join("; ")),
        });
        self.answer(c.seq, &answer);
    }

    /// Opens, closes and retags kernel portals (reactor 0 owns the listeners).
    fn change_portals(
        &mut self,
        add: Vec<(mio::net::TcpListener, u16)>,
        del: &[SocketAddr],
        retag: &[(SocketAddr, u16)],
    ) {
        for slot in self.portals.iter_mut() {
            let Some(p) = slot.as_mut() else { continue };
            if del.contains(&p.addr) {
                let _ = self.poll.registry().deregister(&mut p.listener);
                log::info!(
                    "stopped listening on {} (portal group {})",
                    p.addr,
                    p.pg_tag
                );
                *slot = None;
            } else if let Some((_, tag)) = retag.iter().find(|(a, _)| *a == p.addr) {
                p.pg_tag = *tag;
            }
        }
        for (mut listener, pg_tag) in add {
            let Ok(addr) = listener.local_addr() else {
                continue;
            };
            let i = match self.portals.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.portals.push(None);
                    self.portals.len() - 1
                }
            };
            if let Err(e) =
                self.poll
                    .registry()
                    .register(&mut listener, Token(i), Interest::READABLE)
            {
                log::error!("cannot watch the listener on {addr}: {e}");
                continue;
            }
            log::info!("listening on {addr} (portal group {pg_tag})");
            self.portals[i] = Some(super::Portal {
                listener,
                pg_tag,
                addr,
            });
        }
    }
}

/// The configuration an editing command asks for: the running one with the edit made,
/// validated like a configuration file.
fn edit(model: &Model, op: &str, req: &Value) -> Result<Config, String> {
    if op == "apply" {
        let text = req["toml"].as_str().ok_or("apply needs \"toml\"")?;
        let origin = req["origin"].as_str().unwrap_or("apply");
        return config::parse(text, origin).map_err(|e| e.to_string());
    }
    let mut c = model.current_config();
    let str_arg = |k: &str| req[k].as_str().ok_or_else(|| format!("{op} needs \"{k}\""));
    let num_arg = |k: &str| {
        req[k]
            .as_u64()
            .ok_or_else(|| format!("{op} needs \"{k}\" (a number)"))
    };
    let tag_arg = |k: &str| {
        num_arg(k).and_then(|t| {
            u16::try_from(t)
                .ok()
                .filter(|t| *t > 0)
                .ok_or(format!("{k} must be 1..=65535"))
        })
    };
    let target_index = |c: &Config, name: &str| {
        c.targets
            .iter()
            .position(|t| t.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| format!("no target {name:?}"))
    };
    match op {
        "target-add" => {
            let (node, bdevs) = new_target(model, req)?;
            c.bdevs.extend(bdevs);
            c.targets.push(node);
        }
        "target-del" => {
            let i = target_index(&c, str_arg("target")?)?;
            let t = c.targets.remove(i);
            if !req["keep_bdevs"].as_bool().unwrap_or(false) {
                c.bdevs.retain(|b| !t.luns.iter().any(|l| l.bdev == b.name));
            }
        }
        "lun-add" => {
            let i = target_index(&c, str_arg("target")?)?;
            let lun = num_arg("lun")?;
            let name = c.targets[i].name.clone();
            if c.targets[i].luns.iter().any(|l| l.lun == lun) {
                return Err(format!("target {name} has a LUN {lun}"));
            }
            let bdev = match req["bdev"].as_str() {
                Some(b) => b.to_string(),
                None => {
                    let b = bdev_from_json(&format!("{name}/lun{lun}"), req)?;
                    let n = b.name.clone();
                    c.bdevs.push(b);
                    n
                }
            };
            c.targets[i].luns.push(LunMapping { lun, bdev });
            c.targets[i].luns.sort_by_key(|l| l.lun);
        }
        "lun-del" => {
            let i = target_index(&c, str_arg("target")?)?;
            let lun = num_arg("lun")?;
            let t = &mut c.targets[i];
            let at = t
                .luns
                .iter()
                .position(|l| l.lun == lun)
                .ok_or_else(|| format!("target {} has no LUN {lun}", t.name))?;
            if t.luns.len() == 1 {
                return Err(format!(
                    "LUN {lun} is the last of {}: remove the target instead",
                    t.name
                ));
            }
            let l = t.luns.remove(at);
            if !req["keep_bdev"].as_bool().unwrap_or(false) {
                c.bdevs.retain(|b| b.name != l.bdev);
            }
        }
        "lun-resize" => {
            let i = target_index(&c, str_arg("target")?)?;
            let lun = num_arg("lun")?;
            let size = num_arg("size")?;
            let t = &c.targets[i];
            let bdev = t
                .luns
                .iter()
                .find(|l| l.lun == lun)
                .map(|l| l.bdev.clone())
                .ok_or_else(|| format!("target {} has no LUN {lun}", t.name))?;
            let b = c
                .bdevs
                .iter_mut()
                .find(|b| b.name == bdev)
                .ok_or_else(|| format!("bdev {bdev} is not defined"))?;
            let bs = u64::from(b.block_size);
            if size == 0 || size % bs != 0 {
                return Err(format!(
                    "size {size} is not a positive multiple of the block size {bs}"
                ));
            }
            match &mut b.kind {
                BdevKind::Malloc { size: s } | BdevKind::Null { size: s } => *s = size,
                BdevKind::File { size: s, .. } => *s = Some(size),
            }
        }
        "bdev-add" => {
            let name = str_arg("name")?;
            if name.is_empty() || name.len() > 255 {
                return Err("a bdev name has 1 to 255 characters".into());
            }
            if c.bdevs.iter().any(|b| b.name == name) {
                return Err(format!("bdev {name:?} exists"));
            }
            c.bdevs.push(bdev_from_json(name, req)?);
        }
        "bdev-del" => {
            let name = str_arg("name")?;
            if let Some(t) = c
                .targets
                .iter()
                .find(|t| t.luns.iter().any(|l| l.bdev == name))
            {
                return Err(format!("bdev {name} backs a LUN of {}", t.name));
            }
            let n = c.bdevs.len();
            c.bdevs.retain(|b| b.name != name);
            if c.bdevs.len() == n {
                return Err(format!("no bdev {name:?}"));
            }
        }
        "pg-add" => {
            let tag = tag_arg("tag")?;
            if c.portal_groups.iter().any(|p| p.tag == tag) {
                return Err(format!("portal group {tag} exists"));
            }
            let portals = req["portals"]
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or("pg-add needs \"portals\" (a list of ADDRESS:PORT)")?
                .iter()
                .map(|p| {
                    p.as_str()
                        .ok_or_else(|| "a portal is a string".to_string())
                        .and_then(config::parse_portal)
                })
                .collect::<Result<Vec<_>, _>>()?;
            c.portal_groups.push(crate::tgt::PortalGroup {
                tag,
                portals,
                transport: crate::tgt::Transport::Kernel,
                userspace: None,
            });
        }
        "pg-del" => {
            let tag = tag_arg("tag")?;
            if let Some(t) = c
                .targets
                .iter()
                .find(|t| t.mappings.iter().any(|m| m.portal_group == tag))
            {
                return Err(format!("portal group {tag} is mapped by {}", t.name));
            }
            let n = c.portal_groups.len();
            c.portal_groups.retain(|p| p.tag != tag);
            if c.portal_groups.len() == n {
                return Err(format!("no portal group {tag}"));
            }
        }
        "ig-add" => {
            let tag = tag_arg("tag")?;
            if c.initiator_groups.iter().any(|g| g.tag == tag) {
                return Err(format!("initiator group {tag} exists"));
            }
            let strings = |k: &str| -> Result<Vec<String>, String> {
                req[k]
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .ok_or(format!("ig-add needs \"{k}\" (a list)"))?
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or(format!("{k}: strings only"))
                    })
                    .collect()
            };
            let initiators = strings("initiators")?;
            let netmasks = strings("netmasks")?
                .iter()
                .map(|m| config::parse_netmask(m))
                .collect::<Result<Vec<_>, _>>()?;
            c.initiator_groups.push(crate::tgt::InitiatorGroup {
                tag,
                initiators,
                netmasks,
            });
        }
        "ig-del" => {
            let tag = tag_arg("tag")?;
            if let Some(t) = c
                .targets
                .iter()
                .find(|t| t.mappings.iter().any(|m| m.initiator_group == tag))
            {
                return Err(format!("initiator group {tag} is mapped by {}", t.name));
            }
            let n = c.initiator_groups.len();
            c.initiator_groups.retain(|g| g.tag != tag);
            if c.initiator_groups.len() == n {
                return Err(format!("no initiator group {tag}"));
            }
        }
        other => return Err(format!("unknown op {other:?}")),
    }
    // The same checks as a configuration file gets.
    config::parse(&save::to_toml(&c), "the changed configuration").map_err(|e| e.to_string())
}

/// A bdev from a request's `type` (malloc, null, file), `size` (bytes), `path` and
/// `block_size` (512 or 4096).
fn bdev_from_json(name: &str, v: &Value) -> Result<BdevConfig, String> {
    let block_size = match v.get("block_size") {
        None | Some(Value::Null) => 512,
        Some(b) => match b.as_u64() {
            Some(512) => 512,
            Some(4096) => 4096,
            _ => return Err(format!("{name}: block_size must be 512 or 4096")),
        },
    };
    let size = v["size"].as_u64();
    if let Some(s) = size {
        if s == 0 || s % u64::from(block_size) != 0 {
            return Err(format!(
                "{name}: size {s} is not a positive multiple of {block_size}"
            ));
        }
    }
    let kind = match v["type"].as_str().unwrap_or("malloc") {
        "malloc" => BdevKind::Malloc {
            size: size.ok_or(format!("{name}: a malloc bdev needs a size"))?,
        },
        "null" => BdevKind::Null {
            size: size.ok_or(format!("{name}: a null bdev needs a size"))?,
        },
        "file" => BdevKind::File {
            path: v["path"]
                .as_str()
                .ok_or(format!("{name}: a file bdev needs a path"))?
                .into(),
            size,
            engine: FileEngine::Uring,
            direct: true,
        },
        other => return Err(format!("{name}: unknown bdev type {other:?}")),
    };
    Ok(BdevConfig {
        name: name.to_string(),
        block_size,
        kind,
    })
}

/// Validates a `target-add` request against the current model: the target (name, alias,
/// queue depth, mappings to existing groups) and one new bdev per LUN.
fn new_target(model: &Model, req: &Value) -> Result<(TargetNode, Vec<BdevConfig>), String> {
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
    let mut maps: Vec<LunMapping> = Vec::new();
    let mut bdevs = Vec::new();
    for l in luns {
        let lun = l["lun"]
            .as_u64()
            .filter(|n| *n <= 16383)
            .ok_or("each LUN needs \"lun\" 0..=16383")?;
        if maps.iter().any(|m| m.lun == lun) {
            return Err(format!("LUN {lun} given twice"));
        }
        let bdev = match l["bdev"].as_str() {
            Some(existing) => existing.to_string(),
            None => {
                let b = bdev_from_json(&format!("{name}/lun{lun}"), l)?;
                if cfg.bdevs.iter().any(|o| o.name == b.name) {
                    return Err(format!("bdev {:?} exists", b.name));
                }
                let n = b.name.clone();
                bdevs.push(b);
                n
            }
        };
        maps.push(LunMapping { lun, bdev });
    }
    maps.sort_by_key(|m| m.lun);
    let node = TargetNode {
        name,
        alias,
        luns: maps,
        mappings: vec![PortGroupMapping {
            portal_group: pg as u16,
            initiator_group: ig as u16,
        }],
        queue_depth,
        auth: Default::default(),
    };
    Ok((node, bdevs))
}
