//! CHAP authentication at login (RFC 7143 §12.1.3, RFC 1994): the target's side, one-way
//! (the initiator proves it knows its secret) and mutual (the target then proves it knows
//! its own).
//!
//! Algorithms: CHAP_A 5 (MD5), and like the Linux target also 6 (SHA-1), 7 (SHA-256) and 8
//! (SHA3-256); the strongest the initiator offers is chosen. Challenges come from the
//! operating system's CSPRNG and are as long as the algorithm's digest (16 bytes or more).
//! Binary values are accepted in hex (`0x...`) and base64 (`0b...`) and sent in hex.
//! Responses are compared in constant time; an initiator challenge equal to the target's
//! (a reflection attack) is refused. Secrets never reach a log or a `Debug` output.

use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use sha3::Sha3_256;
use std::fmt;

/// Longest initiator challenge accepted (bytes).
const MAX_CHALLENGE: usize = 1024;

/// A CHAP digest algorithm (the CHAP_A value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5 = 5,
    Sha1 = 6,
    Sha256 = 7,
    Sha3_256 = 8,
}

impl Algorithm {
    fn from_code(n: u64) -> Option<Self> {
        Some(match n {
            5 => Algorithm::Md5,
            6 => Algorithm::Sha1,
            7 => Algorithm::Sha256,
            8 => Algorithm::Sha3_256,
            _ => return None,
        })
    }

    pub fn digest_len(self) -> usize {
        match self {
            Algorithm::Md5 => 16,
            Algorithm::Sha1 => 20,
            Algorithm::Sha256 | Algorithm::Sha3_256 => 32,
        }
    }

    /// The CHAP response: H(identifier || secret || challenge).
    pub fn response(self, id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
        fn h<D: Digest>(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
            let mut d = D::new();
            d.update([id]);
            d.update(secret);
            d.update(challenge);
            d.finalize().to_vec()
        }
        match self {
            Algorithm::Md5 => h::<Md5>(id, secret, challenge),
            Algorithm::Sha1 => h::<Sha1>(id, secret, challenge),
            Algorithm::Sha256 => h::<Sha256>(id, secret, challenge),
            Algorithm::Sha3_256 => h::<Sha3_256>(id, secret, challenge),
        }
    }

    /// Strength order, strongest last.
    fn rank(self) -> u8 {
        match self {
            Algorithm::Md5 => 0,
            Algorithm::Sha1 => 1,
            Algorithm::Sha256 => 2,
            Algorithm::Sha3_256 => 3,
        }
    }
}

/// The strongest algorithm of an initiator's CHAP_A list.
pub fn strongest(list: &str) -> Option<Algorithm> {
    list.split(',')
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .filter_map(Algorithm::from_code)
        .max_by_key(|a| a.rank())
}

/// Whether a target (or discovery) asks for CHAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChapMode {
    /// AuthMethod None only.
    #[default]
    Disabled,
    /// CHAP or None, as the initiator prefers.
    Optional,
    /// CHAP only: a login without it fails with 0x0201.
    Required,
}

/// One set of credentials of an auth group.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapSecret {
    /// The CHAP_N the initiator sends.
    pub user: String,
    pub secret: Vec<u8>,
    /// What the target answers with in mutual CHAP.
    pub mutual_user: Option<String>,
    pub mutual_secret: Option<Vec<u8>>,
}

impl fmt::Debug for ChapSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChapSecret")
            .field("user", &self.user)
            .field("secret", &"<hidden>")
            .field("mutual_user", &self.mutual_user)
            .field(
                "mutual_secret",
                &self.mutual_secret.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

/// How logins to one target (or to discovery) authenticate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthPolicy {
    pub mode: ChapMode,
    /// The initiator must authenticate the target too (it must send CHAP_I and CHAP_C).
    pub mutual: bool,
    pub secrets: Vec<ChapSecret>,
}

impl AuthPolicy {
    /// The AuthMethod to answer: the first of the initiator's list this policy allows.
    pub fn choose_method(&self, offered: &str) -> Option<&'static str> {
        offered
            .split(',')
            .find_map(|m| match (m.trim(), self.mode) {
                ("CHAP", ChapMode::Optional | ChapMode::Required) => Some("CHAP"),
                ("None", ChapMode::Disabled | ChapMode::Optional) => Some("None"),
                _ => None,
            })
    }

    /// Whether a login may go on without authenticating.
    pub fn allows_none(&self) -> bool {
        self.mode != ChapMode::Required
    }
}

/// Why a CHAP exchange failed (for the log: never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapError(pub String);

impl fmt::Display for ChapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail<T>(why: impl Into<String>) -> Result<T, ChapError> {
    Err(ChapError(why.into()))
}

/// A binary value: `0x` hex or `0b` base64 (RFC 7143 §6.1).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    let v = v.trim();
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() {
            return None;
        }
        // An odd number of digits has an implied leading zero.
        let padded;
        let h = if h.len() % 2 == 1 {
            padded = format!("0{h}");
            padded.as_str()
        } else {
            h
        };
        return (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
            .collect();
    }
    let b = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B"))?;
    decode_base64(b)
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    if s.is_empty() || s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// Hex with the `0x` prefix.
pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Equality that takes the same time wherever the first difference is.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A CHAP_I: decimal, or hex.
fn parse_id(v: &str) -> Option<u8> {
    let v = v.trim();
    match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u8::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}

fn random(buf: &mut [u8]) -> Result<(), ChapError> {
    getrandom::getrandom(buf).map_err(|e| ChapError(format!("no random bytes: {e}")))
}

enum State {
    AwaitAlgorithm,
    AwaitResponse {
        alg: Algorithm,
        id: u8,
        challenge: Vec<u8>,
    },
    Done,
}

/// One login's CHAP exchange, target side.
pub struct Chap {
    policy: AuthPolicy,
    state: State,
    /// The CHAP_N that authenticated.
    pub user: Option<String>,
}

impl Chap {
    pub fn new(policy: AuthPolicy) -> Self {
        Chap {
            policy,
            state: State::AwaitAlgorithm,
            user: None,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Takes the CHAP_* keys of one login request and appends the answer's keys to
    /// `reply`. An error fails the login (status 0x0201).
    pub fn step(
        &mut self,
        pairs: &[(String, String)],
        reply: &mut Vec<(String, String)>,
    ) -> Result<(), ChapError> {
        let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v);
        let any = ["CHAP_A", "CHAP_N", "CHAP_R", "CHAP_I", "CHAP_C"]
            .iter()
            .any(|k| get(k).is_some());
        match &self.state {
            State::AwaitAlgorithm => {
                if get("CHAP_N").is_some() || get("CHAP_R").is_some() {
                    return fail("CHAP_N/CHAP_R before the target's challenge");
                }
                let Some(list) = get("CHAP_A") else {
                    return Ok(()); // AuthMethod first; CHAP_A in a later request
                };
                let Some(alg) = strongest(list) else {
                    reply.push(("CHAP_A".into(), "Reject".into()));
                    return fail(format!("no CHAP algorithm we support in CHAP_A={list}"));
                };
                let mut id = [0u8; 1];
                random(&mut id)?;
                let mut challenge = vec![0u8; alg.digest_len().max(16)];
                random(&mut challenge)?;
                reply.push(("CHAP_A".into(), (alg as u8).to_string()));
                reply.push(("CHAP_I".into(), id[0].to_string()));
                reply.push(("CHAP_C".into(), encode_hex(&challenge)));
                self.state = State::AwaitResponse {
                    alg,
                    id: id[0],
                    challenge,
                };
                Ok(())
            }
            State::AwaitResponse { alg, id, challenge } => {
                let (alg, id) = (*alg, *id);
                let (Some(name), Some(resp)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return fail("CHAP_N and CHAP_R expected");
                };
                let resp = decode_binary(resp).ok_or_else(|| ChapError("bad CHAP_R".into()))?;
                let cred = self.policy.secrets.iter().find(|s| &s.user == name);
                // An unknown user costs the same digest as a known one.
                let expected =
                    alg.response(id, cred.map_or(&[][..], |c| c.secret.as_slice()), challenge);
                let Some(cred) = cred else {
                    return fail(format!("unknown CHAP user {name:?}"));
                };
                if !ct_eq(&resp, &expected) {
                    return fail(format!("wrong CHAP response for user {name:?}"));
                }
                let mutual = match (get("CHAP_I"), get("CHAP_C")) {
                    (None, None) if self.policy.mutual => {
                        return fail(format!(
                            "mutual CHAP required; user {name:?} sent no challenge"
                        ))
                    }
                    (None, None) => None,
                    (Some(i), Some(c)) => {
                        let i = parse_id(i).ok_or_else(|| ChapError("bad CHAP_I".into()))?;
                        let c = decode_binary(c)
                            .filter(|c| !c.is_empty() && c.len() <= MAX_CHALLENGE)
                            .ok_or_else(|| ChapError("bad CHAP_C".into()))?;
                        if ct_eq(&c, challenge) {
                            return fail("the initiator's challenge reflects the target's");
                        }
                        Some((i, c))
                    }
                    _ => return fail("CHAP_I and CHAP_C come together"),
                };
                if let Some((i, c)) = mutual {
                    let (Some(mu), Some(ms)) = (&cred.mutual_user, &cred.mutual_secret) else {
                        return fail(format!(
                            "user {name:?} asks for mutual CHAP; no target secret is configured"
                        ));
                    };
                    reply.push(("CHAP_N".into(), mu.clone()));
                    reply.push(("CHAP_R".into(), encode_hex(&alg.response(i, ms, &c))));
                }
                self.user = Some(name.clone());
                self.state = State::Done;
                Ok(())
            }
            State::Done if any => fail("CHAP keys after authentication"),
            State::Done => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        decode_binary(&format!("0x{s}")).unwrap()
    }

    #[test]
    fn known_answers() {
        // Computed independently with Python's hashlib.
        let (sec, ch) = (b"twelve-bytes-secret", (0u8..16).collect::<Vec<_>>());
        let cases = [
            (Algorithm::Md5, "cf92b593a40351737dd7990f84394f23"),
            (Algorithm::Sha1, "8ac44aee1aaf5587949c31289279804fd43d2e02"),
            (
                Algorithm::Sha256,
                "48482b8b67628d71f01c6e6469e8a240fc583c6ded8a38c0ad58c2cbf8af834b",
            ),
            (
                Algorithm::Sha3_256,
                "a5ec1b6b952d4280a8bc0ab2fc1b9f981be84d50253ae4403b26117adfff06da",
            ),
        ];
        for (alg, want) in cases {
            assert_eq!(alg.response(7, sec, &ch), hex(want), "{alg:?}");
            assert_eq!(alg.digest_len(), want.len() / 2);
        }
    }

    #[test]
    fn algorithm_choice_and_encodings() {
        assert_eq!(strongest("5"), Some(Algorithm::Md5));
        assert_eq!(strongest("5,7,6"), Some(Algorithm::Sha256));
        assert_eq!(strongest("8,5"), Some(Algorithm::Sha3_256));
        assert_eq!(strongest("1,2,x"), None);
        assert_eq!(decode_binary("0x0aFF"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAAEC/w=="), Some(vec![0, 1, 2, 0xff]));
        assert_eq!(decode_binary("0bAAECAw"), Some(vec![0, 1, 2, 3]));
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("0b!!!!"), None);
        assert_eq!(decode_binary("1234"), None);
        assert_eq!(encode_hex(&[0, 0xab]), "0x00ab");
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"ab", b"abc"));
        let p = AuthPolicy {
            mode: ChapMode::Optional,
            ..AuthPolicy::default()
        };
        assert_eq!(p.choose_method("None,CHAP"), Some("None"));
        assert_eq!(p.choose_method("CHAP,None"), Some("CHAP"));
        let r = AuthPolicy {
            mode: ChapMode::Required,
            ..AuthPolicy::default()
        };
        assert_eq!(r.choose_method("None"), None);
        assert_eq!(AuthPolicy::default().choose_method("CHAP"), None);
        assert!(format!("{:?}", secret()).contains("<hidden>"));
        assert!(!format!("{:?}", secret()).contains("initiator-secret"));
    }

    fn secret() -> ChapSecret {
        ChapSecret {
            user: "alice".into(),
            secret: b"initiator-secret".to_vec(),
            mutual_user: Some("target".into()),
            mutual_secret: Some(b"target-secret-1".to_vec()),
        }
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Runs the exchange up to the challenge; returns (exchange, alg, id, challenge).
    fn challenged(mutual: bool, algs: &str) -> (Chap, Algorithm, u8, Vec<u8>) {
        let mut c = Chap::new(AuthPolicy {
            mode: ChapMode::Required,
            mutual,
            secrets: vec![secret()],
        });
        let mut reply = Vec::new();
        c.step(&kv(&[]), &mut reply).unwrap();
        assert!(reply.is_empty());
        c.step(&kv(&[("CHAP_A", algs)]), &mut reply).unwrap();
        let get = |k: &str| reply.iter().find(|(x, _)| x == k).unwrap().1.clone();
        let alg = Algorithm::from_code(get("CHAP_A").parse().unwrap()).unwrap();
        let id: u8 = get("CHAP_I").parse().unwrap();
        let ch = decode_binary(&get("CHAP_C")).unwrap();
        assert_eq!(ch.len(), alg.digest_len().max(16));
        (c, alg, id, ch)
    }

    #[test]
    fn one_way_and_mutual_exchanges() {
        let (mut c, alg, id, ch) = challenged(false, "5,7");
        assert_eq!(alg, Algorithm::Sha256);
        let r = encode_hex(&alg.response(id, b"initiator-secret", &ch));
        let mut reply = Vec::new();
        c.step(&kv(&[("CHAP_N", "alice"), ("CHAP_R", &r)]), &mut reply)
            .unwrap();
        assert!(c.is_done() && reply.is_empty());
        assert_eq!(c.user.as_deref(), Some("alice"));
        assert!(c.step(&kv(&[("CHAP_A", "5")]), &mut reply).is_err());

        // Mutual: the target answers the initiator's challenge with its own secret.
        let (mut c, alg, id, ch) = challenged(true, "5");
        let r = encode_hex(&alg.response(id, b"initiator-secret", &ch));
        let theirs = [9u8; 16];
        let mut reply = Vec::new();
        c.step(
            &kv(&[
                ("CHAP_N", "alice"),
                ("CHAP_R", &r),
                ("CHAP_I", "33"),
                ("CHAP_C", &encode_hex(&theirs)),
            ]),
            &mut reply,
        )
        .unwrap();
        assert_eq!(reply[0], ("CHAP_N".to_string(), "target".to_string()));
        assert_eq!(
            decode_binary(&reply[1].1).unwrap(),
            Algorithm::Md5.response(33, b"target-secret-1", &theirs)
        );
    }

    #[test]
    fn refusals() {
        // Wrong secret, unknown user, garbage response.
        for (n, secret) in [
            ("alice", &b"wrong-secret-xx"[..]),
            ("bob", b"initiator-secret"),
        ] {
            let (mut c, alg, id, ch) = challenged(false, "5");
            let r = encode_hex(&alg.response(id, secret, &ch));
            let e = c
                .step(&kv(&[("CHAP_N", n), ("CHAP_R", &r)]), &mut Vec::new())
                .unwrap_err();
            assert!(!e.0.contains("secret-"), "no secret in {e}");
        }
        let (mut c, _, _, _) = challenged(false, "5");
        assert!(c
            .step(
                &kv(&[("CHAP_N", "alice"), ("CHAP_R", "0xzz")]),
                &mut Vec::new()
            )
            .is_err());
        // Mutual required but not asked for; a reflected challenge; half a mutual pair.
        let (mut c, alg, id, ch) = challenged(true, "5");
        let r = encode_hex(&alg.response(id, b"initiator-secret", &ch));
        let e = c
            .step(&kv(&[("CHAP_N", "alice"), ("CHAP_R", &r)]), &mut Vec::new())
            .unwrap_err();
        assert!(e.0.contains("mutual CHAP required"), "{e}");
        let (mut c, alg, id, ch) = challenged(false, "5");
        let r = encode_hex(&alg.response(id, b"initiator-secret", &ch));
        let e = c
            .step(
                &kv(&[
                    ("CHAP_N", "alice"),
                    ("CHAP_R", &r),
                    ("CHAP_I", "1"),
                    ("CHAP_C", &encode_hex(&ch)),
                ]),
                &mut Vec::new(),
            )
            .unwrap_err();
        assert!(e.0.contains("reflects"), "{e}");
        let (mut c, alg, id, ch) = challenged(false, "5");
        let r = encode_hex(&alg.response(id, b"initiator-secret", &ch));
        assert!(c
            .step(
                &kv(&[("CHAP_N", "alice"), ("CHAP_R", &r), ("CHAP_I", "1")]),
                &mut Vec::new()
            )
            .is_err());
        // No algorithm in common; a response before any challenge.
        let mut c = Chap::new(AuthPolicy::default());
        let mut reply = Vec::new();
        assert!(c.step(&kv(&[("CHAP_A", "1,2")]), &mut reply).is_err());
        assert_eq!(reply, kv(&[("CHAP_A", "Reject")]));
        let mut c = Chap::new(AuthPolicy::default());
        assert!(c
            .step(&kv(&[("CHAP_N", "a"), ("CHAP_R", "0x00")]), &mut Vec::new())
            .is_err());
    }
}
