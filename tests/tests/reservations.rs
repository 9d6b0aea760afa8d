//! Persistent reservations and task management end to end, with raw iSCSI sessions:
//!
//! * APTPL: registrations and a reservation made with "persist through power loss" are in
//!   the state file, survive a restart of the target, and belong to the same initiator
//!   ports afterwards (exact keys, type, generation, access and unit attentions).
//! * Task management under load: LOGICAL UNIT RESET, TARGET WARM RESET and ABORT TASK while
//!   writes are in flight in an io_uring file bdev, from sessions on two reactors. Every
//!   command gets exactly one answer or is covered by its session's TMF response, nothing
//!   arrives for an aborted task after that response, other sessions' aborted commands end
//!   with TASK ABORTED, and the LUN serves every session afterwards.

use e2e::raw::{RawPdu, RawSession};
use e2e::{artifacts_dir, malloc_bdev, one_lun_config, Target, DEFAULT_IQN};
use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

const HOST_A: &str = "iqn.2026-11.io.test:host-a";
const HOST_B: &str = "iqn.2026-11.io.test:host-b";

fn config(state_dir: &Path, bdev: &str, cpumask: &str) -> String {
    let global = format!(
        "cpumask = \"{cpumask}\"\nstate_dir = \"{}\"",
        state_dir.display()
    );
    one_lun_config(&global, bdev, "D0")
}

/// PERSISTENT RESERVE OUT with a basic 24-byte parameter list.
fn pr_out(
    s: &mut RawSession,
    sa: u8,
    kind: u8,
    key: u64,
    sa_key: u64,
    aptpl: bool,
) -> (u8, Option<(u8, u8, u8)>) {
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    p[20] = u8::from(aptpl);
    let cdb = [0x5F, sa, kind, 0, 0, 0, 0, 0, 24, 0];
    let r = s.command_with(0, &cdb, 0, &p).expect("PR OUT answer");
    (r.status, r.key_asc_ascq())
}

fn pr_in(s: &mut RawSession, sa: u8) -> Vec<u8> {
    let cdb = [0x5E, sa, 0, 0, 0, 0, 0, 0x10, 0, 0];
    let r = s.command(0, &cdb, 4096).expect("PR IN answer");
    assert_eq!(r.status, 0, "PR IN {sa}: {:?}", r.key_asc_ascq());
    r.data
}

fn write1(s: &mut RawSession, lba: u32) -> u8 {
    s.write10(0, lba, &[0x5A; 512])
        .expect("WRITE answer")
        .status
}

fn read1(s: &mut RawSession, lba: u32) -> u8 {
    s.read10(0, lba, 1).expect("READ answer").status
}

#[test]
fn aptpl_reservations_survive_a_restart() {
    let state = artifacts_dir().join(format!("pr-state-{}", std::process::id()));
    let _ = fs::remove_dir_all(&state);
    let toml = config(&state, &malloc_bdev("D0", "64MiB"), "0x1");
    let mut t = Target::start_with_config("pr-aptpl", &toml, DEFAULT_IQN, 0);
    let file = state.join("pr").join(DEFAULT_IQN).join("lun0.json");
    {
        let mut a = RawSession::login(&t.portal(), HOST_A, DEFAULT_IQN);
        let mut b = RawSession::login(&t.portal(), HOST_B, DEFAULT_IQN);
        // REGISTER AND IGNORE EXISTING KEY with APTPL, both hosts; A reserves WRITE EXCLUSIVE.
        assert_eq!(pr_out(&mut a, 6, 0, 0, 0xA1, true), (0, None));
        assert_eq!(pr_out(&mut b, 6, 0, 0, 0xB2, true), (0, None));
        assert_eq!(pr_out(&mut a, 1, 1, 0xA1, 0, false), (0, None));
        assert_eq!(write1(&mut b, 0), 0x18, "RESERVATION CONFLICT");
        assert!(file.exists(), "{} written", file.display());
    }
    let saved = fs::read_to_string(&file).unwrap();
    assert!(
        saved.contains(HOST_A) && saved.contains("0x00000000000000a1"),
        "{saved}"
    );
    t.stop();

    let mut t = Target::start_with_config("pr-aptpl-2", &toml, DEFAULT_IQN, 0);
    let mut a = RawSession::login(&t.portal(), HOST_A, DEFAULT_IQN);
    let mut b = RawSession::login(&t.portal(), HOST_B, DEFAULT_IQN);
    // READ KEYS: generation 2 (two registrations), both keys.
    let keys = pr_in(&mut b, 0);
    assert_eq!(&keys[0..8], &[0, 0, 0, 2, 0, 0, 0, 16]);
    let mut listed = vec![
        u64::from_be_bytes(keys[8..16].try_into().unwrap()),
        u64::from_be_bytes(keys[16..24].try_into().unwrap()),
    ];
    listed.sort_unstable();
    assert_eq!(listed, vec![0xA1, 0xB2]);
    // READ RESERVATION: A's key, WRITE EXCLUSIVE.
    let res = pr_in(&mut b, 1);
    assert_eq!(&res[4..8], &[0, 0, 0, 16]);
    assert_eq!(&res[8..16], &0xA1u64.to_be_bytes());
    assert_eq!(res[21], 1);
    // REPORT CAPABILITIES: PTPL_C and PTPL_A.
    let caps = pr_in(&mut b, 2);
    assert_eq!((caps[2] & 0x01, caps[3] & 0x01), (1, 1));
    // READ FULL STATUS names A's initiator port (fixed ISID of the raw client).
    let full = String::from_utf8_lossy(&pr_in(&mut b, 3)).to_string();
    assert!(
        full.contains(&format!("{HOST_A},i,0x80007e570001")),
        "{full:?}"
    );
    // The same initiator ports, the same rights: B reads, cannot write; A writes.
    assert_eq!(read1(&mut b, 0), 0);
    assert_eq!(write1(&mut b, 0), 0x18);
    assert_eq!(write1(&mut a, 0), 0);
    // B preempts A: A learns REGISTRATIONS PREEMPTED, then conflicts.
    assert_eq!(pr_out(&mut b, 4, 1, 0xB2, 0xA1, false), (0, None));
    let r = a.write10(0, 0, &[1; 512]).unwrap();
    assert_eq!((r.status, r.key_asc_ascq()), (2, Some((6, 0x2A, 0x05))));
    assert_eq!(write1(&mut a, 0), 0x18);
    assert_eq!(write1(&mut b, 0), 0);
    // B's PREEMPT carried no APTPL bit, but only REGISTER decides it: still persistent.
    assert!(fs::read_to_string(&file).unwrap().contains(HOST_B));
    // CLEAR: nothing left, the state file goes.
    assert_eq!(pr_out(&mut b, 3, 0, 0xB2, 0, false), (0, None));
    assert!(!file.exists());
    assert_eq!(write1(&mut a, 0), 0);
    t.stop();
    let _ = fs::remove_dir_all(&state);
}

/// One answer: its position in the stream, its status and (fixed-format) sense key, ASC
/// and ASCQ.
type Answer = (usize, u8, Option<(u8, u8, u8)>);

/// Answers per ITT from `pdus`: SCSI Responses and Data-In with status.
fn statuses(pdus: &[RawPdu]) -> HashMap<u32, Answer> {
    let mut m = HashMap::new();
    for (i, p) in pdus.iter().enumerate() {
        let itt = u32::from_be_bytes(p.bhs[16..20].try_into().unwrap());
        let answer = match p.opcode() {
            0x21 => {
                let sense =
                    (p.data.len() >= 16).then(|| (p.data[4] & 0x0F, p.data[14], p.data[15]));
                Some((i, p.bhs[3], sense))
            }
            0x25 if p.bhs[1] & 0x01 != 0 => Some((i, p.bhs[3], None)),
            _ => None,
        };
        if let Some(a) = answer {
            assert!(m.insert(itt, a).is_none(), "two answers for ITT {itt}");
        }
    }
    m
}

fn tmf_position(pdus: &[RawPdu], itt: u32) -> (usize, u8) {
    let found: Vec<(usize, u8)> = pdus
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            p.opcode() == 0x22 && u32::from_be_bytes(p.bhs[16..20].try_into().unwrap()) == itt
        })
        .map(|(i, p)| (i, p.bhs[2]))
        .collect();
    assert_eq!(found.len(), 1, "one TMF response");
    found[0]
}

fn start_writes(s: &mut RawSession, n: u32, base: u32) -> Vec<u32> {
    (0..n)
        .map(|i| {
            let lba = base + i * 128;
            let mut cdb = [0u8; 10];
            cdb[0] = 0x2A;
            cdb[1] = 0x08; // FUA: each write waits for the disk, so many are in flight
            cdb[2..6].copy_from_slice(&lba.to_be_bytes());
            cdb[7..9].copy_from_slice(&128u16.to_be_bytes());
            s.start_command(0, &cdb, 0, &vec![i as u8; 64 * 1024])
        })
        .collect()
}

#[test]
fn task_management_under_load_answers_everything_once() {
    let state = artifacts_dir().join(format!("tmf-state-{}", std::process::id()));
    let img = artifacts_dir().join(format!("tmf-{}.img", std::process::id()));
    let bdev = format!(
        "[[bdev]]\nname = \"D0\"\ntype = \"file\"\npath = \"{}\"\nsize = \"256MiB\"\nengine = \"uring\"",
        img.display()
    );
    let toml = config(&state, &bdev, "0x3");
    let mut t = Target::start_with_config("tmf-load", &toml, DEFAULT_IQN, 0);
    let portal = t.portal();
    // Several sessions: the target places connections on the least-loaded reactor, so they
    // spread over both.
    let mut x = RawSession::login(&portal, HOST_A, DEFAULT_IQN);
    let mut y = RawSession::login(&portal, HOST_B, DEFAULT_IQN);
    let quiet = Duration::from_millis(1500);

    for (round, function) in [(0u32, 5u8), (1, 6), (2, 1)] {
        let base = round * 32 * 128;
        let xs = start_writes(&mut x, 24, base);
        let ys = start_writes(&mut y, 24, base + 16384);
        let referenced = xs[xs.len() - 1];
        let tmf = x.start_tmf(function, 0, referenced);
        let got_x = x.drain(quiet);
        let got_y = y.drain(quiet);
        let (tmf_at, response) = tmf_position(&got_x, tmf);
        let ans_x = statuses(&got_x);
        let ans_y = statuses(&got_y);
        match function {
            // ABORT TASK: done or the task had already finished.
            1 => assert!(matches!(response, 0 | 1), "ABORT TASK response {response}"),
            _ => assert_eq!(response, 0, "reset response"),
        }
        // The TMF's own session: every command the TMF covers (all for a reset, the
        // referenced one for ABORT TASK) answered before the TMF response or not at all
        // (aborted); never after it.
        let covered = if function == 1 {
            &xs[xs.len() - 1..]
        } else {
            &xs[..]
        };
        for itt in covered {
            if let Some(&(at, status, _)) = ans_x.get(itt) {
                assert!(
                    at < tmf_at,
                    "round {round}: ITT {itt} answered after its TMF"
                );
                assert_eq!(status, 0, "round {round}: ITT {itt}");
            }
        }
        if function == 1 {
            // Only the referenced task may go unanswered; the others finish normally.
            for itt in &xs[..xs.len() - 1] {
                assert_eq!(
                    ans_x.get(itt).map(|a| a.1),
                    Some(0),
                    "round {round}: ITT {itt}"
                );
            }
        }
        // The other session: every command answered exactly once: GOOD, TASK ABORTED (a
        // reset aborts other sessions' tasks; TAS=1), or, for one arriving after the reset,
        // the reset's unit attention.
        let expect = if function == 5 {
            (6, 0x29, 0x03)
        } else {
            (6, 0x29, 0x00)
        };
        let mut y_saw_ua = false;
        for itt in &ys {
            let answer = ans_y.get(itt).map(|a| (a.1, a.2));
            match (function, answer) {
                (_, Some((0, _))) => {}
                (5 | 6, Some((0x40, _))) => {}
                (5 | 6, Some((2, Some(s)))) if s == expect && !y_saw_ua => y_saw_ua = true,
                _ => panic!("round {round}: ITT {itt}: {answer:?}"),
            }
        }
        let count = |ans: &HashMap<u32, Answer>, itts: &[u32], status: Option<u8>| {
            itts.iter()
                .filter(|i| ans.get(i).map(|a| a.1) == status)
                .count()
        };
        eprintln!(
            "round {round} (TMF function {function}, response {response}): session X {} good, \
             {} aborted unanswered; session Y {} good, {} TASK ABORTED, {} with the UA",
            count(&ans_x, &xs, Some(0)),
            count(&ans_x, &xs, None),
            count(&ans_y, &ys, Some(0)),
            count(&ans_y, &ys, Some(0x40)),
            count(&ans_y, &ys, Some(2)),
        );
        // After a reset both sessions see its unit attention once, then carry on.
        for (s, seen) in [(&mut x, false), (&mut y, y_saw_ua)] {
            let r = s.tur(0).expect("TUR");
            if function == 1 || seen {
                assert_eq!(r.status, 0);
                continue;
            }
            assert_eq!(
                (r.status, r.key_asc_ascq()),
                (2, Some(expect)),
                "round {round}"
            );
            assert_eq!(s.tur(0).expect("TUR").status, 0);
        }
        assert_eq!(write1(&mut x, 1), 0);
        assert_eq!(write1(&mut y, 2), 0);
    }
    drop(x);
    drop(y);
    t.assert_running();
    let log = t.log_contents();
    assert!(!log.contains("panicked"), "{log}");
    t.stop();
    let _ = fs::remove_file(&img);
    let _ = fs::remove_dir_all(&state);
}
