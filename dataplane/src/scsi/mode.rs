//! Mode parameters: the caching, control and informational exceptions pages, MODE SENSE
//! rendering and MODE SELECT validation.

use super::cdb::ModePc;
use super::sense::{asc, Sense};

/// The LUN's current mode parameters. Only the changeable bits are stored; the rest is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeState {
    pub wce: bool,
    pub d_sense: bool,
    /// Software write protect (control page SWP).
    pub swp: bool,
}

impl Default for ModeState {
    fn default() -> Self {
        ModeState {
            wce: true,
            d_sense: false,
            swp: false,
        }
    }
}

const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0A;
const INFO_EXCEPTIONS: u8 = 0x1C;
const ALL_PAGES: u8 = 0x3F;
const PAGES: [u8; 3] = [CACHING, CONTROL, INFO_EXCEPTIONS];

#[derive(Clone, Copy)]
enum View {
    Values(ModeState),
    Changeable,
}

fn render_page(code: u8, view: View) -> Vec<u8> {
    match code {
        CACHING => {
            let mut p = vec![0u8; 20];
            p[0] = CACHING;
            p[1] = 18;
            match view {
                View::Values(s) => p[2] = if s.wce { 0x04 } else { 0 },
                View::Changeable => p[2] = 0x04,
            }
            p
        }
        CONTROL => {
            let mut p = vec![0u8; 12];
            p[0] = CONTROL;
            p[1] = 10;
            match view {
                View::Values(s) => {
                    p[2] = if s.d_sense { 0x04 } else { 0 };
                    p[3] = 0x10; // unrestricted reordering
                    p[4] = if s.swp { 0x08 } else { 0 };
                    // TAS: tasks aborted for another I_T nexus end with TASK ABORTED.
                    p[5] = 0x40;
                    p[8..10].copy_from_slice(&0xFFFFu16.to_be_bytes()); // busy timeout: unlimited
                }
                View::Changeable => {
                    p[2] = 0x04;
                    p[4] = 0x08;
                }
            }
            p
        }
        _ => {
            let mut p = vec![0u8; 12];
            p[0] = INFO_EXCEPTIONS;
            p[1] = 10;
            if let View::Values(_) = view {
                p[2] = 0x08; // DEXCPT: no informational exceptions reported
            }
            p
        }
    }
}

/// Everything MODE SENSE needs besides the CDB.
pub struct SenseRequest {
    pub ten: bool,
    pub dbd: bool,
    pub llbaa: bool,
    pub pc: ModePc,
    pub page: u8,
    pub subpage: u8,
    pub block_size: u32,
    pub num_blocks: u64,
}

/// Builds the full MODE SENSE(6)/(10) response (before allocation-length truncation).
pub fn mode_sense(req: &SenseRequest, current: ModeState) -> Result<Vec<u8>, Sense> {
    let view = match req.pc {
        ModePc::Current => View::Values(current),
        ModePc::Default => View::Values(ModeState::default()),
        ModePc::Changeable => View::Changeable,
        ModePc::Saved => return Err(Sense::illegal(asc::SAVING_PARAMETERS_NOT_SUPPORTED)),
    };
    let pages: Vec<u8> = match (req.page, req.subpage) {
        (ALL_PAGES, 0x00 | 0xFF) => PAGES.to_vec(),
        (p, 0x00) if PAGES.contains(&p) => vec![p],
        (p, _) if PAGES.contains(&p) || p == ALL_PAGES => {
            return Err(Sense::invalid_cdb(3, None));
        }
        _ => return Err(Sense::invalid_cdb(2, Some(5))),
    };
    let mut body = Vec::new();
    for p in pages {
        body.extend(render_page(p, view));
    }
    let mut desc = Vec::new();
    if !req.dbd {
        if req.ten && req.llbaa {
            desc.extend_from_slice(&req.num_blocks.to_be_bytes());
            desc.extend_from_slice(&[0; 4]);
            desc.extend_from_slice(&req.block_size.to_be_bytes());
        } else {
            let n = u32::try_from(req.num_blocks).unwrap_or(u32::MAX);
            desc.extend_from_slice(&n.to_be_bytes());
            desc.push(0);
            desc.extend_from_slice(&req.block_size.to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter: WP as software write protect says, DPOFUA = 1.
    let wp = match view {
        View::Values(s) if s.swp => 0x80,
        _ => 0,
    };
    let dsp = 0x10 | wp;
    let mut v = if req.ten {
        let mut h = vec![0u8; 8];
        h[3] = dsp;
        if req.llbaa && !desc.is_empty() {
            h[4] = 0x01;
        }
        h[6..8].copy_from_slice(&(desc.len() as u16).to_be_bytes());
        h
    } else {
        vec![0, 0, dsp, desc.len() as u8]
    };
    v.extend(desc);
    v.extend(body);
    if req.ten {
        let len = (v.len() - 2) as u16;
        v[0..2].copy_from_slice(&len.to_be_bytes());
    } else {
        v[0] = (v.len() - 1) as u8;
    }
    Ok(v)
}

/// Validates a MODE SELECT parameter list and returns the state it asks for.
pub fn mode_select(
    ten: bool,
    pf: bool,
    sp: bool,
    data: &[u8],
    current: ModeState,
    block_size: u32,
) -> Result<ModeState, Sense> {
    if !pf {
        return Err(Sense::invalid_cdb(1, Some(4)));
    }
    if sp {
        return Err(Sense::invalid_cdb(1, Some(0)));
    }
    if data.is_empty() {
        return Ok(current);
    }
    let hdr = if ten { 8 } else { 4 };
    if data.len() < hdr {
        return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
    }
    let (bdl, long) = if ten {
        (
            usize::from(u16::from_be_bytes([data[6], data[7]])),
            data[4] & 1 != 0,
        )
    } else {
        (usize::from(data[3]), false)
    };
    let desc_len = if long { 16 } else { 8 };
    let pages_at = hdr
        .checked_add(bdl)
        .filter(|&e| e <= data.len())
        .ok_or_else(|| Sense::invalid_param(if ten { 6 } else { 3 }, None))?;
    if bdl % desc_len != 0 {
        return Err(Sense::invalid_param(if ten { 6 } else { 3 }, None));
    }
    // Block descriptors may restate our block length but not change it.
    let mut at = hdr;
    while at < pages_at {
        let bl = if long {
            u32::from_be_bytes([data[at + 12], data[at + 13], data[at + 14], data[at + 15]])
        } else {
            u32::from_be_bytes([0, data[at + 5], data[at + 6], data[at + 7]])
        };
        if bl != block_size {
            return Err(Sense::invalid_param(at + if long { 12 } else { 5 }, None));
        }
        at += desc_len;
    }
    let mut next = current;
    let mut at = pages_at;
    while at < data.len() {
        if data.len() - at < 2 {
            return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
        }
        let code = data[at] & 0x3F;
        if data[at] & 0x40 != 0 || !PAGES.contains(&code) {
            return Err(Sense::invalid_param(at, None));
        }
        let cur = render_page(code, View::Values(next));
        let chg = render_page(code, View::Changeable);
        let len = usize::from(data[at + 1]) + 2;
        if len != cur.len() {
            return Err(Sense::invalid_param(at + 1, None));
        }
        let Some(new) = data.get(at..at + len) else {
            return Err(Sense::illegal(asc::PARAMETER_LIST_LENGTH_ERROR));
        };
        for i in 2..len {
            let diff = (new[i] ^ cur[i]) & !chg[i];
            if diff != 0 {
                let bit = 7 - diff.leading_zeros() as u8;
                return Err(Sense::invalid_param(at + i, Some(bit)));
            }
        }
        match code {
            CACHING => next.wce = new[2] & 0x04 != 0,
            CONTROL => {
                next.d_sense = new[2] & 0x04 != 0;
                next.swp = new[4] & 0x08 != 0;
            }
            _ => {}
        }
        at += len;
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(page: u8, pc: ModePc, ten: bool, dbd: bool) -> SenseRequest {
        SenseRequest {
            ten,
            dbd,
            llbaa: false,
            pc,
            page,
            subpage: 0,
            block_size: 512,
            num_blocks: 2048,
        }
    }

    #[test]
    fn sense6_control_page_with_descriptor() {
        let v = mode_sense(
            &req(CONTROL, ModePc::Current, false, false),
            ModeState::default(),
        )
        .unwrap();
        assert_eq!(&v[0..4], &[3 + 8 + 12, 0, 0x10, 8]);
        assert_eq!(&v[4..12], &[0, 0, 0x08, 0x00, 0, 0, 0x02, 0x00]);
        assert_eq!(&v[12..16], &[0x0A, 10, 0, 0x10]);
    }

    #[test]
    fn sense10_all_pages_long_lba() {
        let mut r = req(ALL_PAGES, ModePc::Changeable, true, false);
        r.llbaa = true;
        let v = mode_sense(&r, ModeState::default()).unwrap();
        assert_eq!(usize::from(u16::from_be_bytes([v[0], v[1]])), v.len() - 2);
        assert_eq!(v[4], 1);
        assert_eq!(&v[6..8], &[0, 16]);
        assert_eq!(&v[8..16], &2048u64.to_be_bytes());
        assert_eq!(v.len(), 8 + 16 + 20 + 12 + 12);
        assert_eq!(&v[24..27], &[0x08, 18, 0x04]);
    }

    #[test]
    fn saved_and_unknown_pages() {
        let e = mode_sense(
            &req(CONTROL, ModePc::Saved, false, true),
            ModeState::default(),
        );
        assert_eq!(
            e.unwrap_err(),
            Sense::illegal(asc::SAVING_PARAMETERS_NOT_SUPPORTED)
        );
        let e = mode_sense(
            &req(0x19, ModePc::Current, false, true),
            ModeState::default(),
        );
        assert_eq!(e.unwrap_err(), Sense::invalid_cdb(2, Some(5)));
    }

    #[test]
    fn select_sets_d_sense() {
        let cur = ModeState::default();
        let mut page = render_page(CONTROL, View::Values(cur));
        page[2] |= 0x04;
        let mut data = vec![0, 0, 0, 0];
        data.extend(page);
        let next = mode_select(false, true, false, &data, cur, 512).unwrap();
        assert!(next.d_sense);
        assert!(!next.swp);
    }

    #[test]
    fn swp_sets_write_protect_flag() {
        let cur = ModeState {
            swp: true,
            ..ModeState::default()
        };
        let v = mode_sense(&req(CONTROL, ModePc::Current, false, true), cur).unwrap();
        assert_eq!(v[2], 0x90);
        assert_eq!(v[4 + 4], 0x08);
    }

    #[test]
    fn select_rejects_fixed_bits_and_pf0() {
        let cur = ModeState::default();
        let mut page = render_page(CONTROL, View::Values(cur));
        page[3] = 0x00;
        let mut data = vec![0, 0, 0, 0];
        data.extend(page);
        let e = mode_select(false, true, false, &data, cur, 512).unwrap_err();
        assert_eq!(e, Sense::invalid_param(7, Some(4)));
        assert_eq!(
            mode_select(false, false, false, &data, cur, 512).unwrap_err(),
            Sense::invalid_cdb(1, Some(4))
        );
    }

    #[test]
    fn select_with_block_descriptor_and_truncated_list() {
        let cur = ModeState::default();
        let mut data = vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0x02, 0x00];
        data.extend(render_page(CACHING, View::Values(cur)));
        assert_eq!(mode_select(false, true, false, &data, cur, 512), Ok(cur));
        data.truncate(20);
        assert!(mode_select(false, true, false, &data, cur, 512).is_err());
        data[10] = 0x10;
        assert!(mode_select(false, true, false, &data[..12], cur, 512).is_err());
    }
}
