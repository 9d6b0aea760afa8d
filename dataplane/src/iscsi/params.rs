//! Operational parameter negotiation (RFC 7143 §6.2 and §13).
//!
//! Each key has a type (declarative, list, boolean with AND/OR result, numerical with MIN/MAX
//! result) and a default. [`Negotiator::offer`] takes one key=value from the initiator and
//! returns what the target answers (if anything); [`Negotiator::finish`] yields the values the
//! session and connection run with. Keys the initiator never offers keep their RFC defaults.

use crate::tgt::Global;

/// Discovery or normal session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// Values a session runs with once login completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub max_connections: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u32,
}

impl Default for SessionParams {
    /// RFC 7143 defaults.
    fn default() -> Self {
        SessionParams {
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// Values one connection runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnParams {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The largest data segment the initiator accepts (what we may send).
    pub initiator_mrdsl: u32,
    /// The largest data segment we accept (what we declared).
    pub target_mrdsl: u32,
}

impl Default for ConnParams {
    fn default() -> Self {
        ConnParams {
            header_digest: false,
            data_digest: false,
            initiator_mrdsl: 8192,
            target_mrdsl: 8192,
        }
    }
}

/// What the target answers to one offered key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Send `key=value` back.
    Reply(String),
    /// Declarative key, or one handled elsewhere (login identity keys): no reply.
    Silent,
}

const NOT_UNDERSTOOD: &str = "NotUnderstood";
const IRRELEVANT: &str = "Irrelevant";
const REJECT: &str = "Reject";

/// Negotiates the keys of one login (or of a Text exchange in full feature phase).
#[derive(Debug, Clone)]
pub struct Negotiator {
    limits: Global,
    session_type: SessionType,
    pub session: SessionParams,
    pub conn: ConnParams,
    /// AuthMethod result, once negotiated.
    pub auth_method: Option<String>,
    /// Whether the initiator offered FirstBurstLength (we clamp it only then).
    first_burst_offered: bool,
    /// A connection joining an existing session (MC/S): the session's values, which
    /// leading-only keys cannot change.
    joined: Option<SessionParams>,
}

fn parse_number(v: &str) -> Option<u64> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if hex.is_empty() || hex.len() > 16 {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    } else {
        if v.is_empty() || v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        v.parse().ok()
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

impl Negotiator {
    /// HeaderDigest and DataDigest as agreed so far (true: CRC32C).
    pub fn digests(&self) -> (bool, bool) {
        (self.conn.header_digest, self.conn.data_digest)
    }

    pub fn new(limits: &Global, session_type: SessionType) -> Self {
        let conn = ConnParams {
            target_mrdsl: limits.max_recv_data_segment_length,
            ..ConnParams::default()
        };
        Negotiator {
            limits: limits.clone(),
            session_type,
            session: SessionParams::default(),
            conn,
            auth_method: None,
            first_burst_offered: false,
            joined: None,
        }
    }

    /// This login adds a connection to a session that runs with `session`.
    pub fn join(&mut self, session: SessionParams) {
        self.joined = Some(session);
    }

    /// Keys only the leading connection of a session negotiates (RFC 7143 §13: "LO").
    fn leading_only(key: &str) -> bool {
        Self::discovery_irrelevant(key)
            || matches!(
                key,
                "DefaultTime2Wait" | "DefaultTime2Retain" | "ErrorRecoveryLevel"
            )
    }

    pub fn set_session_type(&mut self, t: SessionType) {
        self.session_type = t;
    }

    pub fn session_type(&self) -> SessionType {
        self.session_type
    }

    fn numeric(&self, v: &str, lo: u64, hi: u64) -> Option<u32> {
        parse_number(v)
            .filter(|n| (lo..=hi).contains(n))
            .map(|n| n as u32)
    }

    /// Session-wide keys that have no meaning in a discovery session.
    fn discovery_irrelevant(key: &str) -> bool {
        matches!(
            key,
            "MaxConnections"
                | "InitialR2T"
                | "ImmediateData"
                | "MaxBurstLength"
                | "FirstBurstLength"
                | "MaxOutstandingR2T"
                | "DataPDUInOrder"
                | "DataSequenceInOrder"
        )
    }

    /// Handles one offered key; returns the answer to send.
    pub fn offer(&mut self, key: &str, value: &str) -> Answer {
        if self.session_type == SessionType::Discovery && Self::discovery_irrelevant(key) {
            return Answer::Reply(IRRELEVANT.into());
        }
        if self.joined.is_some() && Self::leading_only(key) {
            return Answer::Reply(IRRELEVANT.into());
        }
        let reply = match key {
            // Identity keys: declarative, consumed by the login state machine.
            "InitiatorName" | "InitiatorAlias" | "TargetName" | "SessionType" => {
                return Answer::Silent
            }
            // Keys only a target may send.
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => REJECT.to_string(),
            "SendTargets" => IRRELEVANT.to_string(),
            "AuthMethod" => {
                // CHAP arrives with its own issue; until then only None is offered.
                if value.split(',').any(|m| m == "None") {
                    self.auth_method = Some("None".into());
                    "None".to_string()
                } else {
                    REJECT.to_string()
                }
            }
            "HeaderDigest" | "DataDigest" => {
                use crate::tgt::DigestPolicy as P;
                let header = key == "HeaderDigest";
                let policy = if header {
                    self.limits.header_digest
                } else {
                    self.limits.data_digest
                };
                // The first value of the initiator's list the policy allows.
                let chosen = value.split(',').map(str::trim).find(|v| {
                    matches!(
                        (*v, policy),
                        ("None", P::None | P::Any) | ("CRC32C", P::Crc32c | P::Any)
                    )
                });
                match chosen {
                    Some(c) => {
                        let crc = c == "CRC32C";
                        if header {
                            self.conn.header_digest = crc;
                        } else {
                            self.conn.data_digest = crc;
                        }
                        c.to_string()
                    }
                    None => REJECT.to_string(),
                }
            }
            "MaxConnections" => match self.numeric(value, 1, 65535) {
                Some(n) => {
                    self.session.max_connections = n.min(self.limits.max_connections);
                    self.session.max_connections.to_string()
                }
                None => REJECT.into(),
            },
            "InitialR2T" => match parse_bool(value) {
                Some(b) => {
                    self.session.initial_r2t = b || self.limits.initial_r2t;
                    yes_no(self.session.initial_r2t)
                }
                None => REJECT.into(),
            },
            "ImmediateData" => match parse_bool(value) {
                Some(b) => {
                    self.session.immediate_data = b && self.limits.immediate_data;
                    yes_no(self.session.immediate_data)
                }
                None => REJECT.into(),
            },
            "MaxRecvDataSegmentLength" => match self.numeric(value, 512, 16_777_215) {
                Some(n) => {
                    self.conn.initiator_mrdsl = n;
                    return Answer::Reply(self.conn.target_mrdsl.to_string());
                }
                None => REJECT.into(),
            },
            "MaxBurstLength" => match self.numeric(value, 512, 16_777_215) {
                Some(n) => {
                    self.session.max_burst_length = n.min(self.limits.max_burst_length);
                    self.session.max_burst_length.to_string()
                }
                None => REJECT.into(),
            },
            "FirstBurstLength" => match self.numeric(value, 512, 16_777_215) {
                Some(n) => {
                    self.first_burst_offered = true;
                    self.session.first_burst_length = n.min(self.limits.first_burst_length);
                    self.session.first_burst_length.to_string()
                }
                None => REJECT.into(),
            },
            "DefaultTime2Wait" => match self.numeric(value, 0, 3600) {
                Some(n) => {
                    self.session.default_time2wait = n.max(self.limits.default_time2wait);
                    self.session.default_time2wait.to_string()
                }
                None => REJECT.into(),
            },
            "DefaultTime2Retain" => match self.numeric(value, 0, 3600) {
                Some(n) => {
                    self.session.default_time2retain = n.min(self.limits.default_time2retain);
                    self.session.default_time2retain.to_string()
                }
                None => REJECT.into(),
            },
            "MaxOutstandingR2T" => match self.numeric(value, 1, 65535) {
                Some(n) => {
                    self.session.max_outstanding_r2t = n.min(self.limits.max_outstanding_r2t);
                    self.session.max_outstanding_r2t.to_string()
                }
                None => REJECT.into(),
            },
            "DataPDUInOrder" => match parse_bool(value) {
                // OR function: we always want in-order data, so the result is Yes.
                Some(_) => {
                    self.session.data_pdu_in_order = true;
                    yes_no(true)
                }
                None => REJECT.into(),
            },
            "DataSequenceInOrder" => match parse_bool(value) {
                Some(_) => {
                    self.session.data_sequence_in_order = true;
                    yes_no(true)
                }
                None => REJECT.into(),
            },
            "ErrorRecoveryLevel" => match self.numeric(value, 0, 2) {
                Some(n) => {
                    self.session.error_recovery_level = n.min(self.limits.error_recovery_level);
                    self.session.error_recovery_level.to_string()
                }
                None => REJECT.into(),
            },
            // RFC 3720 markers: we never use them (AND result with our No).
            "OFMarker" | "IFMarker" => match parse_bool(value) {
                Some(_) => yes_no(false),
                None => REJECT.into(),
            },
            "OFMarkInt" | "IFMarkInt" => IRRELEVANT.into(),
            _ => NOT_UNDERSTOOD.into(),
        };
        Answer::Reply(reply)
    }

    /// Applies cross-key rules once all keys are in and returns the final values.
    pub fn finish(&mut self) -> (SessionParams, ConnParams) {
        if let Some(s) = self.joined.clone() {
            return (s, self.conn);
        }
        let s = &mut self.session;
        if !self.first_burst_offered {
            s.first_burst_length = s.first_burst_length.min(self.limits.first_burst_length);
        }
        // FirstBurstLength must not exceed MaxBurstLength (RFC 7143 §13.14).
        if s.first_burst_length > s.max_burst_length {
            s.first_burst_length = s.max_burst_length;
        }
        (self.session.clone(), self.conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg() -> Negotiator {
        Negotiator::new(&Global::default(), SessionType::Normal)
    }

    fn reply(n: &mut Negotiator, k: &str, v: &str) -> String {
        match n.offer(k, v) {
            Answer::Reply(s) => s,
            Answer::Silent => "<silent>".into(),
        }
    }

    #[test]
    fn numeric_min_and_max_results() {
        let mut n = neg();
        assert_eq!(reply(&mut n, "MaxBurstLength", "16776192"), "1048576");
        assert_eq!(reply(&mut n, "MaxBurstLength", "4096"), "4096");
        assert_eq!(reply(&mut n, "FirstBurstLength", "1048576"), "262144");
        assert_eq!(reply(&mut n, "DefaultTime2Wait", "0"), "2");
        assert_eq!(reply(&mut n, "DefaultTime2Retain", "0"), "0");
        assert_eq!(reply(&mut n, "MaxOutstandingR2T", "0x10"), "1");
        assert_eq!(reply(&mut n, "ErrorRecoveryLevel", "2"), "0");
        let (s, _) = n.finish();
        assert_eq!(s.max_burst_length, 4096);
        assert_eq!(s.first_burst_length, 4096, "clamped to MaxBurstLength");
    }

    #[test]
    fn out_of_range_and_malformed_values_are_rejected() {
        let mut n = neg();
        assert_eq!(reply(&mut n, "MaxBurstLength", "511"), "Reject");
        assert_eq!(reply(&mut n, "MaxBurstLength", "16777216"), "Reject");
        assert_eq!(reply(&mut n, "MaxBurstLength", "-1"), "Reject");
        assert_eq!(reply(&mut n, "MaxBurstLength", "0x"), "Reject");
        assert_eq!(reply(&mut n, "InitialR2T", "yes"), "Reject");
        assert_eq!(reply(&mut n, "ErrorRecoveryLevel", "3"), "Reject");
    }

    #[test]
    fn boolean_functions() {
        let mut n = neg();
        assert_eq!(
            reply(&mut n, "InitialR2T", "No"),
            "No",
            "OR with our default No"
        );
        let strict = Global {
            initial_r2t: true,
            ..Global::default()
        };
        let mut n2 = Negotiator::new(&strict, SessionType::Normal);
        assert_eq!(
            reply(&mut n2, "InitialR2T", "No"),
            "Yes",
            "OR with a configured Yes"
        );
        assert_eq!(reply(&mut n, "ImmediateData", "Yes"), "Yes");
        assert_eq!(reply(&mut n, "ImmediateData", "No"), "No", "AND");
        let mut g = Global {
            initial_r2t: false,
            ..Global::default()
        };
        let mut n = Negotiator::new(&g, SessionType::Normal);
        assert_eq!(reply(&mut n, "InitialR2T", "No"), "No");
        g.immediate_data = false;
        let mut n = Negotiator::new(&g, SessionType::Normal);
        assert_eq!(reply(&mut n, "ImmediateData", "Yes"), "No");
    }

    #[test]
    fn declarative_mrdsl_answers_ours() {
        let mut n = neg();
        assert_eq!(reply(&mut n, "MaxRecvDataSegmentLength", "4096"), "262144");
        let (_, c) = n.finish();
        assert_eq!(c.initiator_mrdsl, 4096);
        assert_eq!(c.target_mrdsl, 262144);
    }

    #[test]
    fn lists_unknown_and_irrelevant() {
        let mut n = neg();
        // The first value offered that the policy (default: either) allows.
        assert_eq!(reply(&mut n, "HeaderDigest", "CRC32C,None"), "CRC32C");
        assert_eq!(reply(&mut n, "DataDigest", "None,CRC32C"), "None");
        assert_eq!(n.digests(), (true, false));
        let mut g = Global {
            header_digest: crate::tgt::DigestPolicy::None,
            data_digest: crate::tgt::DigestPolicy::Crc32c,
            ..Global::default()
        };
        let mut strict = Negotiator::new(&g, SessionType::Normal);
        assert_eq!(reply(&mut strict, "HeaderDigest", "CRC32C"), "Reject");
        assert_eq!(reply(&mut strict, "DataDigest", "None,CRC32C"), "CRC32C");
        assert_eq!(reply(&mut strict, "DataDigest", "None"), "Reject");
        g.header_digest = crate::tgt::DigestPolicy::Any;
        assert_eq!(
            reply(
                &mut Negotiator::new(&g, SessionType::Normal),
                "HeaderDigest",
                "x"
            ),
            "Reject"
        );
        assert_eq!(reply(&mut n, "AuthMethod", "CHAP,None"), "None");
        assert_eq!(reply(&mut n, "X-com.example.Foo", "1"), "NotUnderstood");
        assert_eq!(reply(&mut n, "Bogus", "1"), "NotUnderstood");
        assert_eq!(reply(&mut n, "InitiatorName", "iqn.x"), "<silent>");
        assert_eq!(reply(&mut n, "TargetAlias", "x"), "Reject");
        let mut d = Negotiator::new(&Global::default(), SessionType::Discovery);
        assert_eq!(reply(&mut d, "MaxBurstLength", "4096"), "Irrelevant");
        assert_eq!(reply(&mut d, "MaxRecvDataSegmentLength", "4096"), "262144");
    }

    #[test]
    fn defaults_when_nothing_offered() {
        let mut n = neg();
        let (s, c) = n.finish();
        assert_eq!(s, SessionParams::default());
        assert_eq!(c.initiator_mrdsl, 8192);
    }
}
