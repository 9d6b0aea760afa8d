//! REPORT SUPPORTED OPERATION CODES (SPC-4 6.35), generated from the decoder's table.

use super::cdb::{has_service_action, lookup, OpInfo, OPS};
use super::sense::Sense;

/// Nominal and recommended command timeouts in seconds (RCTD).
const NOMINAL_TIMEOUT: u32 = 1;
const RECOMMENDED_TIMEOUT: u32 = 30;

fn timeouts() -> [u8; 12] {
    let mut t = [0u8; 12];
    t[0..2].copy_from_slice(&10u16.to_be_bytes());
    t[4..8].copy_from_slice(&NOMINAL_TIMEOUT.to_be_bytes());
    t[8..12].copy_from_slice(&RECOMMENDED_TIMEOUT.to_be_bytes());
    t
}

fn all_commands(rctd: bool) -> Vec<u8> {
    let mut v = vec![0u8; 4];
    for o in OPS {
        v.push(o.opcode);
        v.push(0);
        v.extend_from_slice(&o.service_action.unwrap_or(0).to_be_bytes());
        v.push(0);
        let mut flags = 0;
        if rctd {
            flags |= 0x02;
        }
        if o.service_action.is_some() {
            flags |= 0x01;
        }
        v.push(flags);
        v.extend_from_slice(&(o.usage.len() as u16).to_be_bytes());
        if rctd {
            v.extend_from_slice(&timeouts());
        }
    }
    let len = (v.len() - 4) as u32;
    v[0..4].copy_from_slice(&len.to_be_bytes());
    v
}

fn one_command(info: Option<&OpInfo>, rctd: bool) -> Vec<u8> {
    match info {
        None => vec![0, 0x01, 0, 0],
        Some(o) => {
            let mut v = vec![0, 0x03 | if rctd { 0x80 } else { 0 }];
            v.extend_from_slice(&(o.usage.len() as u16).to_be_bytes());
            v.extend_from_slice(o.usage);
            if rctd {
                v.extend_from_slice(&timeouts());
            }
            v
        }
    }
}

/// The parameter data for the given reporting options (before allocation-length truncation).
pub fn report(rctd: bool, options: u8, opcode: u8, sa: u16) -> Result<Vec<u8>, Sense> {
    match options {
        0 => Ok(all_commands(rctd)),
        1 => {
            if has_service_action(opcode) {
                return Err(Sense::invalid_cdb(2, Some(2)));
            }
            Ok(one_command(lookup(opcode, None), rctd))
        }
        2 => {
            if !has_service_action(opcode) {
                return Err(Sense::invalid_cdb(2, Some(2)));
            }
            Ok(one_command(lookup(opcode, Some(sa)), rctd))
        }
        3 => {
            let info = if has_service_action(opcode) {
                lookup(opcode, Some(sa))
            } else if sa == 0 {
                lookup(opcode, None)
            } else {
                None
            };
            Ok(one_command(info, rctd))
        }
        _ => Err(Sense::invalid_cdb(2, Some(2))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_commands_layout() {
        let v = report(false, 0, 0, 0).unwrap();
        assert_eq!(v.len(), 4 + 8 * OPS.len());
        assert_eq!(
            u32::from_be_bytes(v[0..4].try_into().unwrap()) as usize,
            v.len() - 4
        );
        assert_eq!(&v[4..12], &[0x00, 0, 0, 0, 0, 0, 0, 6]);
        let rc16 = OPS
            .iter()
            .position(|o| o.service_action == Some(0x10))
            .unwrap();
        let d = &v[4 + 8 * rc16..12 + 8 * rc16];
        assert_eq!(d, &[0x9E, 0, 0, 0x10, 0, 0x01, 0, 16]);
        let t = report(true, 0, 0, 0).unwrap();
        assert_eq!(t.len(), 4 + 20 * OPS.len());
        assert_eq!(t[9], 0x02);
        assert_eq!(&t[12..14], &[0, 10]);
    }

    #[test]
    fn one_command_forms() {
        let v = report(false, 1, 0x28, 0).unwrap();
        assert_eq!(&v[0..4], &[0, 3, 0, 10]);
        assert_eq!(v[4], 0x28);
        assert_eq!(v.len(), 14);
        assert!(report(false, 1, 0x9E, 0x10).is_err());
        assert!(report(false, 2, 0x28, 0).is_err());
        let v = report(true, 2, 0x9E, 0x12).unwrap();
        assert_eq!(v[1], 0x83);
        assert_eq!(v.len(), 4 + 16 + 12);
        assert_eq!(report(false, 3, 0xC0, 0).unwrap(), vec![0, 1, 0, 0]);
        assert!(report(false, 7, 0, 0).is_err());
    }
}
