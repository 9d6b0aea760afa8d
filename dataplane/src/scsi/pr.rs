//! Persistent reservations (SPC-4 5.7): registrations, the reservation, PERSISTENT RESERVE
//! IN/OUT and the access check every command goes through.
//!
//! Registrations are keyed by I_T nexus. SPC-4 keeps them across nexus loss, but a nexus id
//! here never comes back once its session is gone, so [`Pr::remove_nexus`] drops them: a
//! registration nobody can ever release again would block the LUN until a restart.

use std::collections::BTreeMap;

use super::sense::{asc, Sense};
use super::NexusId;

pub const WRITE_EXCLUSIVE: u8 = 1;
pub const EXCLUSIVE_ACCESS: u8 = 3;
pub const WRITE_EXCLUSIVE_RO: u8 = 5;
pub const EXCLUSIVE_ACCESS_RO: u8 = 6;
pub const WRITE_EXCLUSIVE_AR: u8 = 7;
pub const EXCLUSIVE_ACCESS_AR: u8 = 8;

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

#[derive(Debug, Default)]
pub struct Pr {
    generation: u32,
    keys: BTreeMap<NexusId, u64>,
    /// Holder (meaningless for the all-registrants types) and type.
    reservation: Option<(NexusId, u8)>,
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

impl Pr {
    /// True while any registration exists (SPC-2 RESERVE/RELEASE then conflict).
    pub fn active(&self) -> bool {
        !self.keys.is_empty() || self.reservation.is_some()
    }

    fn holds(&self, nexus: NexusId) -> bool {
        match self.reservation {
            Some((_, kind)) if all_registrants(kind) => self.keys.contains_key(&nexus),
            Some((holder, _)) => holder == nexus,
            None => false,
        }
    }

    /// The access rules of SPC-4 table 49 for a nexus that may not hold the reservation.
    pub fn allows(&self, nexus: NexusId, access: Access) -> bool {
        let Some((_, kind)) = self.reservation else {
            return true;
        };
        if access == Access::Always || self.holds(nexus) {
            return true;
        }
        let registered = self.keys.contains_key(&nexus);
        match kind {
            WRITE_EXCLUSIVE => access == Access::Read,
            WRITE_EXCLUSIVE_RO | WRITE_EXCLUSIVE_AR => registered || access == Access::Read,
            EXCLUSIVE_ACCESS_RO | EXCLUSIVE_ACCESS_AR => registered,
            _ => false,
        }
    }

    pub fn remove_nexus(&mut self, nexus: NexusId) {
        if self.keys.remove(&nexus).is_some() {
            self.generation = self.generation.wrapping_add(1);
        }
        self.drop_reservation_of(nexus);
    }

    /// Releases the reservation when `nexus` no longer may hold it.
    fn drop_reservation_of(&mut self, nexus: NexusId) {
        let release = match self.reservation {
            // Every registrant holds these; the reservation ends with the last of them.
            Some((_, kind)) if all_registrants(kind) => self.keys.is_empty(),
            Some((holder, _)) => holder == nexus,
            None => false,
        };
        if release {
            self.reservation = None;
        }
    }

    /// PERSISTENT RESERVE IN parameter data for service action `sa`.
    pub fn read(&self, sa: u8) -> Result<Vec<u8>, Sense> {
        match sa {
            0x00 => {
                let body: Vec<u8> = self.keys.values().flat_map(|k| k.to_be_bytes()).collect();
                Ok(header(self.generation, &body))
            }
            0x01 => {
                let body = match self.reservation {
                    None => Vec::new(),
                    Some((holder, kind)) => {
                        let key = if all_registrants(kind) {
                            0
                        } else {
                            self.keys.get(&holder).copied().unwrap_or(0)
                        };
                        let mut b = vec![0u8; 16];
                        b[0..8].copy_from_slice(&key.to_be_bytes());
                        b[13] = kind;
                        b
                    }
                };
                Ok(header(self.generation, &body))
            }
            0x02 => {
                // TMV with every type supported; no persistence through power loss.
                let mut v = vec![0u8; 8];
                v[1] = 8;
                v[3] = 0x80;
                v[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02;
                v[5] = 0x01;
                Ok(v)
            }
            0x03 => {
                let mut body = Vec::new();
                for (&nexus, &key) in &self.keys {
                    let mut d = vec![0u8; 24];
                    d[0..8].copy_from_slice(&key.to_be_bytes());
                    if self.holds(nexus) {
                        d[12] = 0x01;
                        d[13] = self.reservation.map_or(0, |(_, k)| k);
                    }
                    // An iSCSI TransportID (protocol 5) whose name this layer does not know.
                    let tid = [0x05, 0, 0, 4, 0, 0, 0, 0];
                    d[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
                    d.extend_from_slice(&tid);
                    body.extend(d);
                }
                Ok(header(self.generation, &body))
            }
            _ => Err(Sense::invalid_cdb(1, Some(4))),
        }
    }

    /// PERSISTENT RESERVE OUT. `notify` receives unit attentions for other nexuses.
    pub fn out(
        &mut self,
        nexus: NexusId,
        sa: u8,
        scope_type: u8,
        params: &[u8],
        notify: &mut dyn FnMut(NexusId, u16),
    ) -> Result<(), PrError> {
        if params.len() != 24 {
            return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR).into());
        }
        let key = u64::from_be_bytes(params[0..8].try_into().unwrap_or([0; 8]));
        let sa_key = u64::from_be_bytes(params[8..16].try_into().unwrap_or([0; 8]));
        if params[20] & 0x08 != 0 {
            // SPEC_I_PT: registering other initiators is not supported.
            return Err(Sense::invalid_param(20, Some(3)).into());
        }
        if params[20] & 0x01 != 0 {
            // APTPL: nothing here survives a power loss (PTPL_C = 0).
            return Err(Sense::invalid_param(20, Some(0)).into());
        }
        let current = self.keys.get(&nexus).copied();
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
        match sa {
            // REGISTER and REGISTER AND IGNORE EXISTING KEY.
            0x00 | 0x06 => {
                match current {
                    None if sa == 0x00 && key != 0 => return Err(PrError::Conflict),
                    Some(k) if sa == 0x00 && k != key => return Err(PrError::Conflict),
                    _ => {}
                }
                if sa_key == 0 {
                    if current.is_some() {
                        self.keys.remove(&nexus);
                        self.after_unregister(nexus, notify);
                    }
                } else {
                    self.keys.insert(nexus, sa_key);
                }
                if current.is_some() || sa_key != 0 {
                    self.generation = self.generation.wrapping_add(1);
                }
                Ok(())
            }
            // RESERVE
            0x01 => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                check_type()?;
                match self.reservation {
                    None => {
                        self.reservation = Some((nexus, kind));
                        Ok(())
                    }
                    Some((_, k)) if k == kind && self.holds(nexus) => Ok(()),
                    Some(_) => Err(PrError::Conflict),
                }
            }
            // RELEASE
            0x02 => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                let Some((_, k)) = self.reservation else {
                    return Ok(());
                };
                if !self.holds(nexus) {
                    return Ok(());
                }
                if scope != 0 || k != kind {
                    return Err(Sense::illegal(asc::INVALID_RELEASE_OF_PR).into());
                }
                self.reservation = None;
                if !matches!(k, WRITE_EXCLUSIVE | EXCLUSIVE_ACCESS) {
                    self.notify_others(nexus, asc::RESERVATIONS_RELEASED, notify);
                }
                Ok(())
            }
            // CLEAR
            0x03 => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                self.notify_others(nexus, asc::RESERVATIONS_PREEMPTED, notify);
                self.keys.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
                Ok(())
            }
            // PREEMPT and PREEMPT AND ABORT (no task aborts needed: see the module contract).
            0x04 | 0x05 => {
                if current != Some(key) {
                    return Err(PrError::Conflict);
                }
                self.preempt(nexus, sa_key, kind, scope, notify)
            }
            _ => Err(Sense::invalid_cdb(1, Some(4)).into()),
        }
    }

    fn notify_others(&self, nexus: NexusId, code: u16, notify: &mut dyn FnMut(NexusId, u16)) {
        for &n in self.keys.keys() {
            if n != nexus {
                notify(n, code);
            }
        }
    }

    fn after_unregister(&mut self, nexus: NexusId, notify: &mut dyn FnMut(NexusId, u16)) {
        let before = self.reservation;
        self.drop_reservation_of(nexus);
        if let (Some((_, k)), None) = (before, self.reservation) {
            if matches!(k, WRITE_EXCLUSIVE_RO | EXCLUSIVE_ACCESS_RO) {
                self.notify_others(nexus, asc::RESERVATIONS_RELEASED, notify);
            }
        }
    }

    /// Removes every registration holding `sa_key` except the preempting nexus's own.
    fn remove_key(
        &mut self,
        nexus: NexusId,
        sa_key: u64,
        notify: &mut dyn FnMut(NexusId, u16),
    ) -> usize {
        let gone: Vec<NexusId> = self
            .keys
            .iter()
            .filter(|(&n, &k)| k == sa_key && n != nexus)
            .map(|(&n, _)| n)
            .collect();
        for n in &gone {
            self.keys.remove(n);
            notify(*n, asc::REGISTRATIONS_PREEMPTED);
        }
        gone.len()
    }

    fn preempt(
        &mut self,
        nexus: NexusId,
        sa_key: u64,
        kind: u8,
        scope: u8,
        notify: &mut dyn FnMut(NexusId, u16),
    ) -> Result<(), PrError> {
        let take_over = |pr: &mut Pr| -> Result<(), PrError> {
            if scope != 0 {
                return Err(Sense::invalid_cdb(2, Some(7)).into());
            }
            if !valid_type(kind) {
                return Err(Sense::invalid_cdb(2, Some(3)).into());
            }
            pr.reservation = Some((nexus, kind));
            Ok(())
        };
        match self.reservation {
            Some((_, k)) if all_registrants(k) && sa_key == 0 => {
                let others: Vec<NexusId> =
                    self.keys.keys().copied().filter(|n| *n != nexus).collect();
                for n in others {
                    self.keys.remove(&n);
                    notify(n, asc::REGISTRATIONS_PREEMPTED);
                }
                take_over(self)?;
            }
            Some((holder, k)) if !all_registrants(k) && self.keys.get(&holder) == Some(&sa_key) => {
                take_over(self)?;
                self.remove_key(nexus, sa_key, notify);
            }
            _ => {
                if sa_key == 0 {
                    return Err(Sense::invalid_param(8, None).into());
                }
                if self.remove_key(nexus, sa_key, notify) == 0 {
                    return Err(PrError::Conflict);
                }
            }
        }
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(key: u64, sa_key: u64) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[0..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p
    }

    fn out(
        pr: &mut Pr,
        n: NexusId,
        sa: u8,
        kind: u8,
        key: u64,
        sa_key: u64,
    ) -> Result<(), PrError> {
        let mut uas = Vec::new();
        pr.out(n, sa, kind, &params(key, sa_key), &mut |n, c| {
            uas.push((n, c))
        })
    }

    #[test]
    fn register_reserve_release() {
        let mut pr = Pr::default();
        assert_eq!(out(&mut pr, 1, 0, 0, 5, 0xAA), Err(PrError::Conflict));
        assert_eq!(out(&mut pr, 1, 0, 0, 0, 0xAA), Ok(()));
        assert_eq!(out(&mut pr, 2, 6, 0, 0, 0xBB), Ok(()));
        let keys = pr.read(0).unwrap();
        assert_eq!(&keys[0..8], &[0, 0, 0, 2, 0, 0, 0, 16]);
        assert_eq!(out(&mut pr, 1, 1, WRITE_EXCLUSIVE, 0xAA, 0), Ok(()));
        assert_eq!(
            out(&mut pr, 2, 1, WRITE_EXCLUSIVE, 0xBB, 0),
            Err(PrError::Conflict)
        );
        assert!(pr.allows(2, Access::Read));
        assert!(!pr.allows(2, Access::Write));
        assert!(pr.allows(1, Access::Write));
        let r = pr.read(1).unwrap();
        assert_eq!(&r[4..8], &[0, 0, 0, 16]);
        assert_eq!(&r[8..16], &0xAAu64.to_be_bytes());
        assert_eq!(r[21], WRITE_EXCLUSIVE);
        assert_eq!(
            out(&mut pr, 1, 2, EXCLUSIVE_ACCESS, 0xAA, 0),
            Err(PrError::Check(Sense::illegal(asc::INVALID_RELEASE_OF_PR)))
        );
        assert_eq!(out(&mut pr, 1, 2, WRITE_EXCLUSIVE, 0xAA, 0), Ok(()));
        assert!(pr.allows(2, Access::Write));
    }

    #[test]
    fn all_registrants_survive_holder_unregistering() {
        let mut pr = Pr::default();
        out(&mut pr, 1, 6, 0, 0, 1).unwrap();
        out(&mut pr, 2, 6, 0, 0, 2).unwrap();
        out(&mut pr, 1, 1, EXCLUSIVE_ACCESS_AR, 1, 0).unwrap();
        assert!(pr.allows(2, Access::Write));
        assert!(!pr.allows(3, Access::Read));
        assert_eq!(&pr.read(1).unwrap()[8..16], &[0; 8]);
        out(&mut pr, 1, 0, 0, 1, 0).unwrap();
        assert!(pr.reservation.is_some());
        out(&mut pr, 2, 0, 0, 2, 0).unwrap();
        assert!(pr.reservation.is_none());
    }

    #[test]
    fn preempt_and_clear() {
        let mut pr = Pr::default();
        out(&mut pr, 1, 6, 0, 0, 1).unwrap();
        out(&mut pr, 2, 6, 0, 0, 2).unwrap();
        out(&mut pr, 1, 1, EXCLUSIVE_ACCESS, 1, 0).unwrap();
        let mut uas = Vec::new();
        pr.out(2, 4, EXCLUSIVE_ACCESS, &params(2, 1), &mut |n, c| {
            uas.push((n, c))
        })
        .unwrap();
        assert_eq!(uas, vec![(1, asc::REGISTRATIONS_PREEMPTED)]);
        assert!(pr.holds(2));
        assert!(!pr.keys.contains_key(&1));
        assert_eq!(out(&mut pr, 2, 4, 0, 2, 9), Err(PrError::Conflict));
        out(&mut pr, 2, 3, 0, 2, 0).unwrap();
        assert!(!pr.active());
    }

    #[test]
    fn parameter_list_checks_and_report_caps() {
        let mut pr = Pr::default();
        let mut uas = |_: NexusId, _: u16| {};
        assert_eq!(
            pr.out(1, 0, 0, &[0; 23], &mut uas),
            Err(PrError::Check(Sense::illegal(
                asc::PARAMETER_LIST_LENGTH_ERROR
            )))
        );
        out(&mut pr, 1, 6, 0, 0, 1).unwrap();
        assert!(matches!(
            out(&mut pr, 1, 1, 2, 1, 0),
            Err(PrError::Check(_))
        ));
        assert_eq!(pr.read(2).unwrap(), vec![0, 8, 0, 0x80, 0xEA, 0x01, 0, 0]);
        assert!(pr.read(4).is_err());
        let fs = pr.read(3).unwrap();
        assert_eq!(&fs[4..8], &[0, 0, 0, 32]);
        pr.remove_nexus(1);
        assert!(!pr.active());
    }
}
