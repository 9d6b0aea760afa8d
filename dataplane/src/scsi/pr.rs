//! Persistent reservations (SPC-4 5.12): registrations, the reservation, PERSISTENT RESERVE
//! IN/OUT, the access check every command goes through, and the state an APTPL registration
//! keeps across restarts.
//!
//! Registrations belong to I_T nexuses named by their SCSI ports ([`ItNexus`]: initiator name
//! and ISID, target portal group), not to sessions: they outlive the session that made them,
//! and a later session from the same initiator port through the same portal group finds them
//! again (I_T nexus loss leaves registrations and the reservation in place, SPC-4 5.12.5).
//! Everything here is pure state; the logical unit turns [`Effects`] into unit attentions,
//! task aborts and the state file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::sense::{asc, Sense};
use super::ItNexus;

pub const WRITE_EXCLUSIVE: u8 = 1;
pub const EXCLUSIVE_ACCESS: u8 = 3;
pub const WRITE_EXCLUSIVE_RO: u8 = 5;
pub const EXCLUSIVE_ACCESS_RO: u8 = 6;
pub const WRITE_EXCLUSIVE_AR: u8 = 7;
pub const EXCLUSIVE_ACCESS_AR: u8 = 8;

/// Registrations one logical unit keeps at most; a new one past it gets INSUFFICIENT
/// REGISTRATION RESOURCES.
pub const MAX_REGISTRATIONS: usize = 1024;

/// PERSISTENT RESERVE OUT service actions.
const REGISTER: u8 = 0x00;
const RESERVE: u8 = 0x01;
const RELEASE: u8 = 0x02;
const CLEAR: u8 = 0x03;
const PREEMPT: u8 = 0x04;
const PREEMPT_AND_ABORT: u8 = 0x05;
const REGISTER_AND_IGNORE: u8 = 0x06;
const REGISTER_AND_MOVE: u8 = 0x07;

/// iSCSI's protocol identifier in TransportIDs (SPC-4 table 444).
const PROTOCOL_ISCSI: u8 = 0x05;

/// How a command touches the logical unit, for the reservation access rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Allowed whatever the reservation (INQUIRY, TEST UNIT READY, ...).
    Always,
    Read,
    Write,
}

/// Why a PERSISTENT RESERVE OUT failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrError {
    Conflict,
    Check(Sense),
}

impl From<Sense> for PrError {
    fn from(s: Sense) -> Self {
        PrError::Check(s)
    }
}

/// What a successful PERSISTENT RESERVE OUT did beyond answering its own nexus.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Unit attentions for other I_T nexuses.
    pub attentions: Vec<(ItNexus, u16)>,
    /// I_T nexuses whose tasks PREEMPT AND ABORT aborts.
    pub aborted: Vec<ItNexus>,
    /// The registrations or the reservation changed (the state file is rewritten).
    pub changed: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pr {
    generation: u32,
    keys: BTreeMap<ItNexus, u64>,
    /// Holder (for the all-registrants types: whoever reserved; every registrant holds) and
    /// type.
    reservation: Option<(ItNexus, u8)>,
    /// Activate Persist Through Power Loss, as the last registration asked.
    aptpl: bool,
}

fn all_registrants(kind: u8) -> bool {
    matches!(kind, WRITE_EXCLUSIVE_AR | EXCLUSIVE_ACCESS_AR)
}

fn valid_type(kind: u8) -> bool {
    matches!(
        kind,
        WRITE_EXCLUSIVE
            | EXCLUSIVE_ACCESS
            | WRITE_EXCLUSIVE_RO
            | EXCLUSIVE_ACCESS_RO
            | WRITE_EXCLUSIVE_AR
            | EXCLUSIVE_ACCESS_AR
    )
}

fn header(generation: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + body.len());
    v.extend_from_slice(&generation.to_be_bytes());
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn be64(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

/// An iSCSI initiator port TransportID (format 01b): "name,i,0xISID", NUL-terminated and
/// padded to a multiple of four bytes, at least 20.
pub fn transport_id(it: &ItNexus) -> Vec<u8> {
    let mut name = it.initiator_port().into_bytes();
    name.push(0);
    while name.len() < 20 || !name.len().is_multiple_of(4) {
        name.push(0);
    }
    let mut v = vec![0x40 | PROTOCOL_ISCSI, 0];
    v.extend_from_slice(&(name.len() as u16).to_be_bytes());
    v.extend(name);
    v
}

/// Parses an iSCSI initiator port TransportID; the error is the offset of the bad field.
pub fn parse_transport_id(t: &[u8]) -> Result<(String, [u8; 6]), usize> {
    if t.len() < 4 || t[0] & 0x0F != PROTOCOL_ISCSI || t[0] >> 6 != 1 {
        return Err(0);
    }
    let len = usize::from(u16::from_be_bytes([t[2], t[3]]));
    let body = t.get(4..4 + len).ok_or(2usize)?;
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let text = std::str::from_utf8(&body[..end]).map_err(|_| 4usize)?;
    let lower = text.to_ascii_lowercase();
    let at = lower.find(",i,0x").ok_or(4usize)?;
    let (name, hex) = (&lower[..at], &lower[at + 5..]);
    if name.is_empty() || hex.len() != 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(4);
    }
    let mut isid = [0u8; 6];
    for (i, b) in isid.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| 4usize)?;
    }
    Ok((name.to_string(), isid))
}

/// The APTPL state file (JSON).
#[derive(Serialize, Deserialize)]
struct Saved {
    version: u32,
    generation: u32,
    registrations: Vec<SavedRegistration>,
    reservation: Option<SavedReservation>,
}

#[derive(Serialize, Deserialize)]
struct SavedRegistration {
    initiator: String,
    isid: String,
    port: u16,
    key: String,
}

#[derive(Serialize, Deserialize)]
struct SavedReservation {
    initiator: String,
    isid: String,
    port: u16,
    #[serde(rename = "type")]
    kind: u8,
}

fn isid_hex(isid: &[u8; 6]) -> String {
    isid.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_isid(s: &str) -> Result<[u8; 6], String> {
    let mut isid = [0u8; 6];
    if s.len() != 12 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("ISID {s:?}: 12 hex digits expected"));
    }
    for (i, b) in isid.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("ISID {s:?}: not hex"))?;
    }
    Ok(isid)
}

impl Pr {
    /// True while any registration exists (SPC-2 RESERVE/RELEASE then conflict).
    pub fn active(&self) -> bool {
        !self.keys.is_empty() || self.reservation.is_some()
    }

    /// Whether the state must survive a restart (the last registration set APTPL).
    pub fn aptpl(&self) -> bool {
        self.aptpl
    }

    fn holds(&self, it: &ItNexus) -> bool {
        match &self.reservation {
            Some((_, kind)) if all_registrants(*kind) => self.keys.contains_key(it),
            Some((holder, _)) => holder == it,
            None => false,
        }
    }

    /// The access rules of SPC-4 table 63 for a nexus that may not hold the reservation.
    pub fn allows(&self, it: &ItNexus, access: Access) -> bool {
        let Some((_, kind)) = self.reservation else {
            return true;
        };
        if access == Access::Always || self.holds(it) {
            return true;
        }
        let registered = self.keys.contains_key(it);
        match kind {
            WRITE_EXCLUSIVE => access == Access::Read,
            WRITE_EXCLUSIVE_RO | WRITE_EXCLUSIVE_AR => registered || access == Access::Read,
            EXCLUSIVE_ACCESS_RO | EXCLUSIVE_ACCESS_AR => registered,
            _ => false,
        }
    }

    /// The state file's text.
    pub fn save(&self) -> String {
        let saved = Saved {
            version: 1,
            generation: self.generation,
            registrations: self
                .keys
                .iter()
                .map(|(it, key)| SavedRegistration {
                    initiator: it.initiator.clone(),
                    isid: isid_hex(&it.isid),
                    port: it.port,
                    key: format!("{key:#018x}"),
                })
                .collect(),
            reservation: self
                .reservation
                .as_ref()
                .map(|(it, kind)| SavedReservation {
                    initiator: it.initiator.clone(),
                    isid: isid_hex(&it.isid),
                    port: it.port,
                    kind: *kind,
                }),
        };
        serde_json::to_string_pretty(&saved).unwrap_or_default() + "\n"
    }

    /// State saved by [`Pr::save`] (APTPL is on: it was when the file was written).
    pub fn load(text: &str) -> Result<Pr, String> {
        let saved: Saved = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if saved.version != 1 {
            return Err(format!("unknown version {}", saved.version));
        }
        let mut pr = Pr {
            generation: saved.generation,
            aptpl: true,
            ..Pr::default()
        };
        for r in saved.registrations {
            let hex = r.key.trim_start_matches("0x");
            let key = u64::from_str_radix(hex, 16).map_err(|_| format!("key {:?}", r.key))?;
            let it = ItNexus::new(&r.initiator, parse_isid(&r.isid)?, r.port);
            if key == 0 || pr.keys.len() >= MAX_REGISTRATIONS {
                return Err(format!("registration of {}", it.initiator_port()));
            }
            pr.keys.insert(it, key);
        }
        if let Some(r) = saved.reservation {
            let it = ItNexus::new(&r.initiator, parse_isid(&r.isid)?, r.port);
            if !valid_type(r.kind) || (!all_registrants(r.kind) && !pr.keys.contains_key(&it)) {
                return Err(format!("reservation of {}", it.initiator_port()));
            }
            pr.reservation = Some((it, r.kind));
        }
        Ok(pr)
    }

    /// PERSISTENT RESERVE IN parameter data for service action `sa`.
    pub fn read(&self, sa: u8) -> Result<Vec<u8>, Sense> {
        match sa {
            0x00 => {
                let body: Vec<u8> = self.keys.values().flat_map(|k| k.to_be_bytes()).collect();
                Ok(header(self.generation, &body))
            }
            0x01 => {
                let body = match &self.reservation {
                    None => Vec::new(),
                    Some((holder, kind)) => {
                        let key = if all_registrants(*kind) {
                            0
                        } else {
                            self.keys.get(holder).copied().unwrap_or(0)
                        };
                        let mut b = vec![0u8; 16];
                        b[0..8].copy_from_slice(&key.to_be_bytes());
                        b[13] = *kind;
                        b
                    }
                };
                Ok(header(self.generation, &body))
            }
            0x02 => {
                // PTPL_C; TMV with every type supported, PTPL_A as the last REGISTER set it.
                // No CRH, SIP_C or ATP_C: RESERVE(6) meets any registration with a conflict,
                // and registrations name one initiator port and one target port.
                let mut v = vec![0u8; 8];
                v[1] = 8;
                v[2] = 0x01;
                v[3] = 0x80 | u8::from(self.aptpl);
                v[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02;
                v[5] = 0x01;
                Ok(v)
            }
            0x03 => {
                let mut body = Vec::new();
                for (it, &key) in &self.keys {
                    let mut d = vec![0u8; 24];
                    d[0..8].copy_from_slice(&key.to_be_bytes());
                    if self.holds(it) {
                        d[12] = 0x01;
                        d[13] = self.reservation.as_ref().map_or(0, |(_, k)| *k);
                    }
                    d[18..20].copy_from_slice(&it.port.to_be_bytes());
                    let tid = transport_id(it);
                    d[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
                    d.extend_from_slice(&tid);
                    body.extend(d);
                }
                Ok(header(self.generation, &body))
            }
            _ => Err(Sense::invalid_cdb(1, Some(4))),
        }
    }

    fn bump(&mut self, fx: &mut Effects) {
        self.generation = self.generation.wrapping_add(1);
        fx.changed = true;
    }

    /// PERSISTENT RESERVE OUT from `who`; `ports` are the target's relative port identifiers
    /// (REGISTER AND MOVE's destination must be one of them).
    pub fn out(
        &mut self,
        who: &ItNexus,
        sa: u8,
        scope_type: u8,
        params: &[u8],
        ports: &[u16],
    ) -> Result<Effects, PrError> {
        if sa > REGISTER_AND_MOVE {
            return Err(Sense::invalid_cdb(1, Some(4)).into());
        }
        if sa != REGISTER_AND_MOVE {
            if params.len() >= 24 && params[20] & 0x08 != 0 {
                // SPEC_I_PT: registering other initiator ports is not supported (SIP_C 0).
                return Err(Sense::invalid_param(20, Some(3)).into());
            }
            if params.len() != 24 {
                return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR).into());
            }
        } else if params.len() < 24 {
            return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR).into());
        }
        let key = be64(&params[0..8]);
        let sa_key = be64(&params[8..16]);
        let current = self.keys.get(who).copied();
        let scope = scope_type >> 4;
        let kind = scope_type & 0x0F;
        let check_type = || -> Result<(), PrError> {
            if scope != 0 {
                return Err(Sense::invalid_cdb(2, Some(7)).into());
            }
            if !valid_type(kind) {
                return Err(Sense::invalid_cdb(2, Some(3)).into());
            }
            Ok(())
        };
        let mut fx = Effects::default();
        match sa {
            REGISTER | REGISTER_AND_IGNORE => {
                if params[20] & 0x04 != 0 {
                    // ALL_TG_PT: a registration names one target port here (ATP_C 0).
                    return Err(Sense::invalid_param(20, Some(2)).into());
                }
                match current {
                    None if sa == REGISTER && key != 0 => return Err(PrError::Conflict),
                    Some(k) if sa == REGISTER && k != key => return Err(PrError::Conflict),
                    _ => {}
                }
                if sa_key == 0 {
                    if current.is_some() {
                        self.keys.remove(who);
                        self.after_unregister(who, &mut fx);
                        self.bump(&mut fx);
                    }
                } else {
                    if current.is_none() && self.keys.len() >= MAX_REGISTRATIONS {
                        return Err(Sense::illegal(asc::INSUFFICIENT_REGISTRATION_RESOURCES).into());
                    }
                    self.keys.insert(who.clone(), sa_key);
                    self.aptpl = params[20] & 0x01 != 0;
                    self.bump(&mut fx);
                }
            }
            RESERVE => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                check_type()?;
                match &self.reservation {
                    None => {
                        self.reservation = Some((who.clone(), kind));
                        fx.changed = true;
                    }
                    Some((_, k)) if *k == kind && self.holds(who) => {}
                    Some(_) => return Err(PrError::Conflict),
                }
            }
            RELEASE => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                let Some((_, k)) = self.reservation.clone() else {
                    return Ok(fx);
                };
                if !self.holds(who) {
                    return Ok(fx);
                }
                if scope != 0 || k != kind {
                    return Err(Sense::illegal(asc::INVALID_RELEASE_OF_PR).into());
                }
                self.reservation = None;
                fx.changed = true;
                if !matches!(k, WRITE_EXCLUSIVE | EXCLUSIVE_ACCESS) {
                    self.notify_others(who, asc::RESERVATIONS_RELEASED, &mut fx);
                }
            }
            CLEAR => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                self.notify_others(who, asc::RESERVATIONS_PREEMPTED, &mut fx);
                self.keys.clear();
                self.reservation = None;
                self.bump(&mut fx);
            }
            PREEMPT | PREEMPT_AND_ABORT => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                self.preempt(who, sa_key, &check_type, kind, &mut fx)?;
                if sa == PREEMPT_AND_ABORT {
                    fx.aborted = fx
                        .attentions
                        .iter()
                        .filter(|(_, c)| *c == asc::REGISTRATIONS_PREEMPTED)
                        .map(|(it, _)| it.clone())
                        .collect();
                }
            }
            _ => self.register_and_move(who, current, key, sa_key, params, ports, &mut fx)?,
        }
        if self.keys.is_empty() && self.reservation.is_none() {
            // Nothing left to persist.
            self.aptpl = false;
        }
        Ok(fx)
    }

    fn notify_others(&self, who: &ItNexus, code: u16, fx: &mut Effects) {
        for it in self.keys.keys() {
            if it != who {
                fx.attentions.push((it.clone(), code));
            }
        }
    }

    /// After `who` unregistered: a reservation it held alone ends (the all-registrants
    /// types end with their last registrant).
    fn after_unregister(&mut self, who: &ItNexus, fx: &mut Effects) {
        let release = match &self.reservation {
            Some((_, kind)) if all_registrants(*kind) => self.keys.is_empty(),
            Some((holder, _)) => holder == who,
            None => false,
        };
        if let (true, Some((_, kind))) = (release, self.reservation.clone()) {
            self.reservation = None;
            if matches!(kind, WRITE_EXCLUSIVE_RO | EXCLUSIVE_ACCESS_RO) {
                self.notify_others(who, asc::RESERVATIONS_RELEASED, fx);
            }
        }
    }

    /// Removes every registration holding `sa_key` except the preempting nexus's own.
    fn remove_key(&mut self, who: &ItNexus, sa_key: u64, fx: &mut Effects) -> usize {
        let gone: Vec<ItNexus> = self
            .keys
            .iter()
            .filter(|(it, &k)| k == sa_key && *it != who)
            .map(|(it, _)| it.clone())
            .collect();
        for it in &gone {
            self.keys.remove(it);
            fx.attentions
                .push((it.clone(), asc::REGISTRATIONS_PREEMPTED));
        }
        gone.len()
    }

    fn preempt(
        &mut self,
        who: &ItNexus,
        sa_key: u64,
        check_type: &dyn Fn() -> Result<(), PrError>,
        kind: u8,
        fx: &mut Effects,
    ) -> Result<(), PrError> {
        match self.reservation.clone() {
            Some((_, k)) if all_registrants(k) && sa_key == 0 => {
                check_type()?;
                let others: Vec<ItNexus> =
                    self.keys.keys().filter(|it| *it != who).cloned().collect();
                for it in others {
                    self.keys.remove(&it);
                    fx.attentions.push((it, asc::REGISTRATIONS_PREEMPTED));
                }
                self.reservation = Some((who.clone(), kind));
            }
            Some((holder, k)) if !all_registrants(k) && self.keys.get(&holder) == Some(&sa_key) => {
                check_type()?;
                self.remove_key(who, sa_key, fx);
                self.reservation = Some((who.clone(), kind));
                if k != kind {
                    // The survivors see the old reservation go (SPC-4 5.12.11.2.4).
                    self.notify_others(who, asc::RESERVATIONS_RELEASED, fx);
                }
            }
            _ => {
                if sa_key == 0 {
                    return Err(Sense::invalid_param(8, None).into());
                }
                if self.remove_key(who, sa_key, fx) == 0 {
                    return Err(PrError::Conflict);
                }
            }
        }
        self.bump(fx);
        Ok(())
    }

    /// REGISTER AND MOVE (SPC-4 5.12.9): the holder hands its reservation to another I_T
    /// nexus, registering that nexus with the service action key if it is not registered.
    #[allow(clippy::too_many_arguments)]
    fn register_and_move(
        &mut self,
        who: &ItNexus,
        current: Option<u64>,
        key: u64,
        sa_key: u64,
        params: &[u8],
        ports: &[u16],
        fx: &mut Effects,
    ) -> Result<(), PrError> {
        let unreg = params[17] & 0x02 != 0;
        let aptpl = params[17] & 0x01 != 0;
        let port = u16::from_be_bytes([params[18], params[19]]);
        let tid_len = u32::from_be_bytes([params[20], params[21], params[22], params[23]]) as usize;
        if params.len() < 24 + tid_len {
            return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR).into());
        }
        if current.is_none() || current != Some(key) {
            return Err(PrError::Conflict);
        }
        let Some((holder, kind)) = self.reservation.clone() else {
            // SPC-4 5.12.8: nothing to move.
            return Err(Sense::invalid_cdb(1, None).into());
        };
        if all_registrants(kind) || holder != *who {
            return Err(PrError::Conflict);
        }
        if sa_key == 0 {
            return Err(Sense::invalid_param(8, None).into());
        }
        let (name, isid) = parse_transport_id(&params[24..24 + tid_len])
            .map_err(|at| Sense::invalid_param(24 + at, None))?;
        if !ports.contains(&port) {
            return Err(Sense::invalid_param(18, None).into());
        }
        let dest = ItNexus::new(&name, isid, port);
        if dest == *who {
            // The I_T nexus the command came through (the same initiator port through
            // another target port is a move between paths, and allowed).
            return Err(Sense::invalid_param(24, None).into());
        }
        if !self.keys.contains_key(&dest) {
            if self.keys.len() >= MAX_REGISTRATIONS {
                return Err(Sense::illegal(asc::INSUFFICIENT_REGISTRATION_RESOURCES).into());
            }
            self.keys.insert(dest.clone(), sa_key);
        }
        self.reservation = Some((dest, kind));
        if unreg {
            self.keys.remove(who);
        }
        self.aptpl = aptpl;
        self.bump(fx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(n: u8) -> ItNexus {
        ItNexus::new(
            &format!("iqn.2026-11.test:host{n}"),
            [0x40, 0, 0, 0, 0, n],
            1,
        )
    }

    fn params(key: u64, sa_key: u64) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p
    }

    fn out(
        pr: &mut Pr,
        n: u8,
        sa: u8,
        kind: u8,
        key: u64,
        sa_key: u64,
    ) -> Result<Effects, PrError> {
        pr.out(&it(n), sa, kind, &params(key, sa_key), &[1, 2])
    }

    fn move_params(key: u64, sa_key: u64, port: u16, dest: &ItNexus, flags: u8) -> Vec<u8> {
        let mut p = params(key, sa_key);
        p[17] = flags;
        p[18..20].copy_from_slice(&port.to_be_bytes());
        let tid = transport_id(dest);
        p[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
        p.extend(tid);
        p
    }

    #[test]
    fn register_reserve_release() {
        let mut pr = Pr::default();
        assert_eq!(out(&mut pr, 1, 0, 0, 5, 0xAA), Err(PrError::Conflict));
        assert!(out(&mut pr, 1, 0, 0, 0, 0xAA).unwrap().changed);
        out(&mut pr, 2, 6, 0, 0, 0xBB).unwrap();
        let keys = pr.read(0).unwrap();
        assert_eq!(&keys[0..8], &[0, 0, 0, 2, 0, 0, 0, 16]);
        out(&mut pr, 1, 1, WRITE_EXCLUSIVE, 0xAA, 0).unwrap();
        assert_eq!(
            out(&mut pr, 2, 1, WRITE_EXCLUSIVE, 0xBB, 0),
            Err(PrError::Conflict)
        );
        assert!(pr.allows(&it(2), Access::Read));
        assert!(!pr.allows(&it(2), Access::Write));
        assert!(pr.allows(&it(1), Access::Write));
        let r = pr.read(1).unwrap();
        assert_eq!(&r[4..8], &[0, 0, 0, 16]);
        assert_eq!(&r[8..16], &0xAAu64.to_be_bytes());
        assert_eq!(r[21], WRITE_EXCLUSIVE);
        assert_eq!(
            out(&mut pr, 1, 2, EXCLUSIVE_ACCESS, 0xAA, 0),
            Err(PrError::Check(Sense::illegal(asc::INVALID_RELEASE_OF_PR)))
        );
        out(&mut pr, 1, 2, WRITE_EXCLUSIVE, 0xAA, 0).unwrap();
        assert!(pr.allows(&it(2), Access::Write));
    }

    #[test]
    fn the_same_ports_are_the_same_nexus_and_other_isids_are_not() {
        let mut pr = Pr::default();
        out(&mut pr, 1, 0, 0, 0, 7).unwrap();
        out(&mut pr, 1, 1, EXCLUSIVE_ACCESS, 7, 0).unwrap();
        // A new session of the same initiator port (same name, ISID, portal group).
        assert!(pr.allows(&it(1), Access::Write));
        let other_isid = ItNexus::new("iqn.2026-11.test:host1", [0x40, 0, 0, 0, 0, 9], 1);
        let other_port = ItNexus::new("iqn.2026-11.test:host1", [0x40, 0, 0, 0, 0, 1], 2);
        assert!(!pr.allows(&other_isid, Access::Read));
        assert!(!pr.allows(&other_port, Access::Read));
        // Initiator names compare without case.
        let upper = ItNexus::new("IQN.2026-11.TEST:HOST1", [0x40, 0, 0, 0, 0, 1], 1);
        assert!(pr.allows(&upper, Access::Write));
    }

    #[test]
    fn all_registrants_are_enforced_and_survive_the_reserver_leaving() {
        let mut pr = Pr::default();
        out(&mut pr, 1, 6, 0, 0, 1).unwrap();
        out(&mut pr, 2, 6, 0, 0, 2).unwrap();
        out(&mut pr, 1, 1, EXCLUSIVE_ACCESS_AR, 1, 0).unwrap();
        assert!(pr.allows(&it(2), Access::Write));
        assert!(!pr.allows(&it(3), Access::Read));
        // Any registrant holds it: re-reserving the same type is fine, another is not.
        out(&mut pr, 2, 1, EXCLUSIVE_ACCESS_AR, 2, 0).unwrap();
        assert_eq!(
            out(&mut pr, 2, 1, EXCLUSIVE_ACCESS, 2, 0),
            Err(PrError::Conflict)
        );
        assert_eq!(&pr.read(1).unwrap()[8..16], &[0; 8]);
        out(&mut pr, 1, 0, 0, 1, 0).unwrap();
        assert!(pr.reservation.is_some());
        assert!(!pr.allows(&it(1), Access::Read));
        out(&mut pr, 2, 0, 0, 2, 0).unwrap();
        assert!(pr.reservation.is_none());
        // WEAR: non-registrants read, not write.
        out(&mut pr, 1, 6, 0, 0, 1).unwrap();
        out(&mut pr, 1, 1, WRITE_EXCLUSIVE_AR, 1, 0).unwrap();
        assert!(pr.allows(&it(3), Access::Read));
        assert!(!pr.allows(&it(3), Access::Write));
    }

    #[test]
    fn preempt_preempt_and_abort_and_clear() {
        let mut pr = Pr::default();
        out(&mut pr, 1, 6, 0, 0, 1).unwrap();
        out(&mut pr, 2, 6, 0, 0, 2).unwrap();
        out(&mut pr, 3, 6, 0, 0, 3).unwrap();
        out(&mut pr, 1, 1, EXCLUSIVE_ACCESS, 1, 0).unwrap();
        let fx = out(&mut pr, 2, 5, WRITE_EXCLUSIVE, 2, 1).unwrap();
        assert_eq!(
            fx.attentions,
            vec![
                (it(1), asc::REGISTRATIONS_PREEMPTED),
                (it(3), asc::RESERVATIONS_RELEASED)
            ]
        );
        assert_eq!(fx.aborted, vec![it(1)]);
        assert!(pr.holds(&it(2)));
        assert!(!pr.keys.contains_key(&it(1)));
        assert_eq!(out(&mut pr, 2, 4, 0, 2, 9), Err(PrError::Conflict));
        assert_eq!(
            out(&mut pr, 2, 4, 0, 2, 0),
            Err(PrError::Check(Sense::invalid_param(8, None)))
        );
        // PREEMPT of a non-holder's key only removes the registration.
        let fx = out(&mut pr, 2, 4, 0, 2, 3).unwrap();
        assert_eq!(fx.attentions, vec![(it(3), asc::REGISTRATIONS_PREEMPTED)]);
        assert!(fx.aborted.is_empty());
        let gen = u32::from_be_bytes(pr.read(0).unwrap()[0..4].try_into().unwrap());
        out(&mut pr, 1, 6, 0, 0, 1).unwrap();
        let fx = out(&mut pr, 2, 3, 0, 2, 0).unwrap();
        assert_eq!(fx.attentions, vec![(it(1), asc::RESERVATIONS_PREEMPTED)]);
        assert!(!pr.active());
        let now = u32::from_be_bytes(pr.read(0).unwrap()[0..4].try_into().unwrap());
        assert_eq!(now, gen + 2);
    }

    #[test]
    fn preempting_all_registrants_with_key_zero_takes_over() {
        let mut pr = Pr::default();
        out(&mut pr, 1, 6, 0, 0, 1).unwrap();
        out(&mut pr, 2, 6, 0, 0, 2).unwrap();
        out(&mut pr, 1, 1, WRITE_EXCLUSIVE_AR, 1, 0).unwrap();
        // A bad type changes nothing.
        assert!(matches!(
            out(&mut pr, 2, 4, 2, 2, 0),
            Err(PrError::Check(_))
        ));
        assert!(pr.keys.contains_key(&it(1)));
        let fx = out(&mut pr, 2, 4, WRITE_EXCLUSIVE, 2, 0).unwrap();
        assert_eq!(fx.attentions, vec![(it(1), asc::REGISTRATIONS_PREEMPTED)]);
        assert_eq!(pr.reservation, Some((it(2), WRITE_EXCLUSIVE)));
    }

    #[test]
    fn register_and_move_hands_the_reservation_over() {
        let mut pr = Pr::default();
        out(&mut pr, 1, 6, 0, 0, 1).unwrap();
        let dest = ItNexus::new("iqn.2026-11.test:host2", [0x40, 0, 0, 0, 0, 2], 2);
        let p = move_params(1, 0x22, 2, &dest, 0);
        // No reservation to move.
        assert_eq!(
            pr.out(&it(1), 7, 0, &p, &[1, 2]),
            Err(PrError::Check(Sense::invalid_cdb(1, None)))
        );
        out(&mut pr, 1, 1, WRITE_EXCLUSIVE, 1, 0).unwrap();
        // Unknown relative port; the issuer itself; key zero.
        let bad_port = move_params(1, 0x22, 9, &dest, 0);
        assert_eq!(
            pr.out(&it(1), 7, 0, &bad_port, &[1, 2]),
            Err(PrError::Check(Sense::invalid_param(18, None)))
        );
        let to_self = move_params(1, 0x22, 1, &it(1), 0);
        assert_eq!(
            pr.out(&it(1), 7, 0, &to_self, &[1, 2]),
            Err(PrError::Check(Sense::invalid_param(24, None)))
        );
        assert!(matches!(
            pr.out(&it(1), 7, 0, &move_params(1, 0, 2, &dest, 0), &[1, 2]),
            Err(PrError::Check(_))
        ));
        // A truncated TransportID.
        let mut short = p.clone();
        short.truncate(30);
        assert_eq!(
            pr.out(&it(1), 7, 0, &short, &[1, 2]),
            Err(PrError::Check(Sense::illegal(
                asc::PARAMETER_LIST_LENGTH_ERROR
            )))
        );
        // UNREG and APTPL.
        let p = move_params(1, 0x22, 2, &dest, 0x03);
        assert!(pr.out(&it(1), 7, 0, &p, &[1, 2]).unwrap().changed);
        assert_eq!(pr.reservation, Some((dest.clone(), WRITE_EXCLUSIVE)));
        assert_eq!(pr.keys.get(&dest), Some(&0x22));
        assert!(!pr.keys.contains_key(&it(1)));
        assert!(pr.aptpl());
        assert!(pr.allows(&dest, Access::Write));
        assert!(!pr.allows(&it(1), Access::Write));
        // All-registrants reservations cannot move.
        let mut ar = Pr::default();
        out(&mut ar, 1, 6, 0, 0, 1).unwrap();
        out(&mut ar, 1, 1, EXCLUSIVE_ACCESS_AR, 1, 0).unwrap();
        assert_eq!(
            ar.out(&it(1), 7, 0, &move_params(1, 2, 2, &dest, 0), &[1, 2]),
            Err(PrError::Conflict)
        );
    }

    #[test]
    fn transport_ids_round_trip_and_bad_ones_name_their_field() {
        let a = ItNexus::new(
            "iqn.2026-11.test:a",
            [0x40, 0x12, 0x34, 0x56, 0x78, 0x9a],
            3,
        );
        let t = transport_id(&a);
        assert_eq!(t[0], 0x45);
        assert_eq!(t.len() % 4, 0);
        assert_eq!(&t[4..40], b"iqn.2026-11.test:a,i,0x40123456789a\0");
        assert_eq!(
            parse_transport_id(&t),
            Ok(("iqn.2026-11.test:a".to_string(), a.isid))
        );
        let mut fc = t.clone();
        fc[0] = 0x00;
        assert_eq!(parse_transport_id(&fc), Err(0));
        let mut no_isid = vec![0x45, 0, 0, 8];
        no_isid.extend(b"iqn.a\0\0\0");
        assert_eq!(parse_transport_id(&no_isid), Err(4));
        // Twelve bytes that are not twelve hex digits (a multi-byte character).
        let mut odd = vec![0x45, 0, 0, 24];
        odd.extend("iqn.a,i,0xab\u{20ac}cdefghi\0\0".as_bytes());
        assert_eq!(parse_transport_id(&odd), Err(4));
        assert!(parse_isid("ab\u{20ac}cdefghi").is_err());
        assert_eq!(parse_transport_id(&t[..10]), Err(2));
    }

    #[test]
    fn parameter_list_checks_and_report_caps() {
        let mut pr = Pr::default();
        assert_eq!(
            pr.out(&it(1), 0, 0, &[0; 23], &[1]),
            Err(PrError::Check(Sense::illegal(
                asc::PARAMETER_LIST_LENGTH_ERROR
            )))
        );
        let mut sip = params(0, 1);
        sip[20] = 0x08;
        assert_eq!(
            pr.out(&it(1), 0, 0, &sip, &[1]),
            Err(PrError::Check(Sense::invalid_param(20, Some(3))))
        );
        let mut atp = params(0, 1);
        atp[20] = 0x04;
        assert_eq!(
            pr.out(&it(1), 0, 0, &atp, &[1]),
            Err(PrError::Check(Sense::invalid_param(20, Some(2))))
        );
        out(&mut pr, 1, 6, 0, 0, 1).unwrap();
        assert!(matches!(
            out(&mut pr, 1, 1, 2, 1, 0),
            Err(PrError::Check(_))
        ));
        assert!(matches!(
            out(&mut pr, 1, 1, 0x11, 1, 0),
            Err(PrError::Check(_))
        ));
        assert_eq!(
            pr.read(2).unwrap(),
            vec![0, 8, 0x01, 0x80, 0xEA, 0x01, 0, 0]
        );
        assert!(pr.read(4).is_err());
        assert!(out(&mut pr, 1, 8, 0, 1, 0).is_err());
        let fs = pr.read(3).unwrap();
        // One descriptor: 24 bytes and a 44-byte TransportID (39 characters, NUL, padding).
        assert_eq!(&fs[4..8], &[0, 0, 0, 68]);
        assert_eq!(&fs[8 + 18..8 + 20], &[0, 1]);
        assert_eq!(&fs[8 + 20..8 + 24], &[0, 0, 0, 44]);
        assert_eq!(&fs[8 + 28..8 + 28 + 22], b"iqn.2026-11.test:host1");
    }

    #[test]
    fn registrations_are_bounded() {
        let mut pr = Pr::default();
        for i in 0..MAX_REGISTRATIONS {
            let n = ItNexus::new(
                "iqn.2026-11.test:many",
                (i as u64).to_be_bytes()[2..].try_into().unwrap(),
                1,
            );
            pr.out(&n, 6, 0, &params(0, 1), &[1]).unwrap();
        }
        assert_eq!(
            out(&mut pr, 1, 6, 0, 0, 1),
            Err(PrError::Check(Sense::illegal(
                asc::INSUFFICIENT_REGISTRATION_RESOURCES
            )))
        );
    }

    #[test]
    fn aptpl_state_round_trips_and_is_dropped_with_the_last_registration() {
        let mut pr = Pr::default();
        let mut p = params(0, 0x1234);
        p[20] = 0x01;
        pr.out(&it(1), 6, 0, &p, &[1]).unwrap();
        out(&mut pr, 2, 6, 0, 0, 0x55).unwrap();
        assert!(!pr.aptpl(), "the last REGISTER decides");
        pr.out(
            &it(1),
            0,
            0,
            &{
                let mut p = params(0x1234, 0x1234);
                p[20] = 1;
                p
            },
            &[1],
        )
        .unwrap();
        assert!(pr.aptpl());
        out(&mut pr, 1, 1, WRITE_EXCLUSIVE_RO, 0x1234, 0).unwrap();
        let text = pr.save();
        let back = Pr::load(&text).unwrap();
        assert_eq!(back, pr);
        assert_eq!(back.read(2).unwrap()[3], 0x81);
        assert!(Pr::load("{").is_err());
        assert!(Pr::load(&text.replace("\"type\": 5", "\"type\": 4")).is_err());
        out(&mut pr, 1, 0, 0, 0x1234, 0).unwrap();
        out(&mut pr, 2, 0, 0, 0x55, 0).unwrap();
        assert!(!pr.active());
        assert!(!pr.aptpl());
    }
}
