//! The login phase (RFC 7143 §6.3, §11.12-13): security → operational → full feature stages,
//! key negotiation, continuation, ISID/TSIH rules and login status answers.
//!
//! [`Login::handle`] consumes one Login Request (header and whole data segment) and returns the
//! Login Response to send and whether the login goes on, failed, or completed.

use super::chap::{AuthPolicy, Chap};
use super::params::{Answer, ConnParams, Negotiator, SessionParams, SessionType};
use super::pdu::{build, Bhs, LoginRequest, SeqNumbers};
use super::{text, LoginStatus, SessionKey, TargetEnv, TargetInfo};
use std::net::SocketAddr;

/// Login stages (CSG/NSG values).
pub const STAGE_SECURITY: u8 = 0;
pub const STAGE_OPERATIONAL: u8 = 1;
pub const STAGE_FULL_FEATURE: u8 = 3;

/// Most bytes of key=value text one login may accumulate through continuations.
const MAX_LOGIN_TEXT: usize = 64 * 1024;

/// What a completed login hands to the full feature phase.
#[derive(Debug, Clone)]
pub struct Established {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub target: Option<TargetInfo>,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub cid: u16,
    pub session: SessionParams,
    pub conn: ConnParams,
    /// The CmdSN the first full-feature command will carry.
    pub exp_cmdsn: u32,
    /// The next StatSN to send.
    pub statsn: u32,
    /// Set when the connection joined an existing session (MC/S).
    pub joined: Option<super::Joined>,
}

/// Result of one login request.
#[derive(Debug)]
pub enum LoginStep {
    /// Send this response; more login requests follow.
    Continue(Bhs, Vec<u8>),
    /// Send this response, then close the connection.
    Failed(Bhs, Vec<u8>, LoginStatus),
    /// Send this response; the connection enters full feature phase.
    Done(Bhs, Vec<u8>, Box<Established>),
}

/// State of one connection's login.
#[derive(Debug)]
pub struct Login {
    conn_uid: u64,
    peer: SocketAddr,
    pg_tag: u16,
    stage: u8,
    started: bool,
    negotiator: Option<Negotiator>,
    initiator_name: Option<String>,
    initiator_alias: Option<String>,
    session_type: SessionType,
    target: Option<TargetInfo>,
    isid: [u8; 6],
    tsih: u16,
    itt: u32,
    cid: u16,
    cmdsn: u32,
    statsn: u32,
    /// Text of a request still being continued (C bit).
    partial: Vec<u8>,
    /// Whether TargetPortalGroupTag was already declared.
    tpgt_sent: bool,
    /// Commands the initiator may send once logged in (MaxCmdSN - ExpCmdSN + 1); during
    /// login only the login itself is outstanding.
    window: u32,
    /// How this login must authenticate (known once the target is).
    auth: AuthPolicy,
    /// The CHAP exchange, once AuthMethod=CHAP was agreed.
    chap: Option<Chap>,
    /// The security stage is satisfied (CHAP done, or None allowed and chosen).
    authenticated: bool,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap")
            .field("done", &self.is_done())
            .finish()
    }
}

impl Login {
    pub fn new(conn_uid: u64, peer: SocketAddr, pg_tag: u16) -> Self {
        Login {
            conn_uid,
            peer,
            pg_tag,
            stage: STAGE_SECURITY,
            started: false,
            negotiator: None,
            initiator_name: None,
            initiator_alias: None,
            session_type: SessionType::Normal,
            target: None,
            isid: [0; 6],
            tsih: 0,
            itt: 0,
            cid: 0,
            cmdsn: 0,
            statsn: 0,
            partial: Vec::new(),
            tpgt_sent: false,
            window: 1,
            auth: AuthPolicy::default(),
            chap: None,
            authenticated: false,
        }
    }

    fn seq(&self) -> SeqNumbers {
        SeqNumbers {
            statsn: self.statsn,
            exp_cmdsn: self.cmdsn,
            max_cmdsn: self.cmdsn.wrapping_add(self.window).wrapping_sub(1),
        }
    }

    fn respond(&mut self, transit: bool, cont: bool, nsg: u8, data: Vec<u8>, tsih: u16) -> Bhs {
        let bhs = build::login_response(
            transit,
            cont,
            self.stage,
            if transit { nsg } else { 0 },
            self.isid,
            tsih,
            self.itt,
            self.seq(),
            (0, 0),
            data.len() as u32,
        );
        self.statsn = self.statsn.wrapping_add(1);
        bhs
    }

    fn fail(&mut self, status: LoginStatus) -> LoginStep {
        let bhs = build::login_response(
            false,
            false,
            self.stage,
            0,
            self.isid,
            0,
            self.itt,
            self.seq(),
            (status.0, status.1),
            0,
        );
        LoginStep::Failed(bhs, Vec::new(), status)
    }

    /// Handles one Login Request with its whole data segment.
    pub fn handle(
        &mut self,
        req: &LoginRequest,
        data: &[u8],
        env: &mut dyn TargetEnv,
    ) -> LoginStep {
        self.itt = req.itt;
        if !self.started {
            self.started = true;
            self.isid = req.isid;
            self.tsih = req.tsih;
            self.cid = req.cid;
            self.cmdsn = req.cmdsn;
            self.statsn = req.exp_statsn;
            // The first request may skip the security stage (RFC 7143 §6.3).
            if req.csg == STAGE_OPERATIONAL {
                self.stage = STAGE_OPERATIONAL;
            }
            // We speak version 0 only (RFC 7143 §11.12.4).
            if req.version_min > 0 {
                return self.fail(LoginStatus::UNSUPPORTED_VERSION);
            }
        } else if req.isid != self.isid || req.tsih != self.tsih || req.cid != self.cid {
            // ISID, TSIH and CID must not change within a login.
            return self.fail(LoginStatus::INITIATOR_ERROR);
        }
        if req.csg != self.stage || req.csg == 2 {
            return self.fail(LoginStatus::INITIATOR_ERROR);
        }
        if req.transit && (req.nsg <= req.csg || req.nsg == 2) {
            return self.fail(LoginStatus::INITIATOR_ERROR);
        }
        if req.transit && req.cont {
            return self.fail(LoginStatus::INITIATOR_ERROR);
        }

        if self.partial.len() + data.len() > MAX_LOGIN_TEXT {
            return self.fail(LoginStatus::OUT_OF_RESOURCES);
        }
        self.partial.extend_from_slice(data);
        if req.cont {
            // The initiator continues its text; acknowledge with an empty response.
            let bhs = self.respond(false, false, 0, Vec::new(), 0);
            return LoginStep::Continue(bhs, Vec::new());
        }
        let text_bytes = std::mem::take(&mut self.partial);
        let pairs = match text::parse(&text_bytes) {
            Ok(p) => p,
            Err(_) => return self.fail(LoginStatus::INITIATOR_ERROR),
        };

        if self.negotiator.is_none() {
            if let Err(status) = self.first_request(&pairs, env) {
                return self.fail(status);
            }
            // A login that skips the security stage must be allowed to go without CHAP.
            if self.stage == STAGE_OPERATIONAL {
                if !self.auth.allows_none() {
                    log::warn!(
                        "login from {}: CHAP required, the initiator skipped the security stage",
                        self.peer
                    );
                    return self.fail(LoginStatus::AUTHENTICATION_FAILED);
                }
                self.authenticated = true;
            }
        }
        // AuthMethod and the CHAP keys belong to the security stage and to this module.
        let (security, pairs): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(k, _)| {
            k.starts_with("CHAP_") || (k == "AuthMethod" && self.stage == STAGE_SECURITY)
        });
        let mut reply = Vec::new();
        if !self.tpgt_sent {
            self.tpgt_sent = true;
            if self.session_type == SessionType::Normal {
                text::push(&mut reply, "TargetPortalGroupTag", &self.pg_tag.to_string());
                if let Some(alias) = self.target.as_ref().and_then(|t| t.alias.clone()) {
                    text::push(&mut reply, "TargetAlias", &alias);
                }
            }
        }
        let neg = self
            .negotiator
            .as_mut()
            .expect("negotiator exists after the first request");
        for (k, v) in &pairs {
            if let Answer::Reply(ans) = neg.offer(k, v) {
                text::push(&mut reply, k, &ans);
            }
        }
        if let Err(status) = self.security(&security, &mut reply) {
            return self.fail(status);
        }
        if req.transit && self.stage == STAGE_SECURITY && !self.authenticated {
            if self.chap.is_some() {
                // CHAP is under way: the target stays in the security stage (T=0).
                let bhs = self.respond(false, false, 0, reply.clone(), 0);
                return LoginStep::Continue(bhs, reply);
            }
            if !self.auth.allows_none() {
                log::warn!(
                    "login from {}: CHAP required, the initiator offered no AuthMethod",
                    self.peer
                );
                return self.fail(LoginStatus::AUTHENTICATION_FAILED);
            }
            self.authenticated = true;
        }

        if !req.transit {
            let bhs = self.respond(false, false, 0, reply.clone(), 0);
            return LoginStep::Continue(bhs, reply);
        }
        if req.nsg == STAGE_FULL_FEATURE {
            return self.complete(reply, env);
        }
        // Security → operational.
        let bhs = self.respond(true, false, req.nsg, reply.clone(), 0);
        self.stage = req.nsg;
        LoginStep::Continue(bhs, reply)
    }

    /// AuthMethod and CHAP_* keys of one request.
    fn security(
        &mut self,
        keys: &[(String, String)],
        reply: &mut Vec<u8>,
    ) -> Result<(), LoginStatus> {
        if keys.is_empty() {
            return Ok(());
        }
        if self.stage != STAGE_SECURITY {
            log::warn!(
                "login from {}: CHAP keys outside the security stage",
                self.peer
            );
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        if let Some((_, offered)) = keys.iter().find(|(k, _)| k == "AuthMethod") {
            if self.chap.is_none() && !self.authenticated {
                match self.auth.choose_method(offered) {
                    Some("CHAP") => {
                        text::push(reply, "AuthMethod", "CHAP");
                        self.chap = Some(Chap::new(self.auth.clone()));
                    }
                    Some(m) => {
                        text::push(reply, "AuthMethod", m);
                        self.authenticated = true;
                    }
                    None => {
                        log::warn!(
                            "login from {}: AuthMethod={offered} refused (CHAP is {:?})",
                            self.peer,
                            self.auth.mode
                        );
                        return Err(LoginStatus::AUTHENTICATION_FAILED);
                    }
                }
            }
        }
        let chap_keys: Vec<(String, String)> = keys
            .iter()
            .filter(|(k, _)| k.starts_with("CHAP_"))
            .cloned()
            .collect();
        let Some(chap) = self.chap.as_mut() else {
            if chap_keys.is_empty() {
                return Ok(());
            }
            log::warn!(
                "login from {}: CHAP keys without AuthMethod=CHAP",
                self.peer
            );
            return Err(LoginStatus::AUTHENTICATION_FAILED);
        };
        if chap.is_done() && chap_keys.is_empty() {
            return Ok(());
        }
        let mut answer = Vec::new();
        if let Err(e) = chap.step(&chap_keys, &mut answer) {
            let who = self.initiator_name.as_deref().unwrap_or("?");
            log::warn!("login from {} ({who}): CHAP failed: {e}", self.peer);
            return Err(LoginStatus::AUTHENTICATION_FAILED);
        }
        for (k, v) in &answer {
            text::push(reply, k, v);
        }
        if chap.is_done() && !self.authenticated {
            self.authenticated = true;
            log::info!(
                "login from {}: CHAP user {:?} authenticated",
                self.peer,
                chap.user.as_deref().unwrap_or("")
            );
        }
        Ok(())
    }

    /// Checks the identity keys of the first request and resolves the target.
    fn first_request(
        &mut self,
        pairs: &[(String, String)],
        env: &mut dyn TargetEnv,
    ) -> Result<(), LoginStatus> {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let initiator = get("InitiatorName").ok_or(LoginStatus::MISSING_PARAMETER)?;
        if initiator.is_empty() {
            return Err(LoginStatus::MISSING_PARAMETER);
        }
        self.initiator_name = Some(initiator.clone());
        self.initiator_alias = get("InitiatorAlias");
        self.session_type = match get("SessionType").as_deref() {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Err(LoginStatus::SESSION_TYPE_NOT_SUPPORTED),
        };
        if self.session_type == SessionType::Normal {
            let name = get("TargetName").ok_or(LoginStatus::MISSING_PARAMETER)?;
            let info = env.login_target(&name, &initiator, self.peer, self.pg_tag)?;
            self.auth = env.auth_policy(Some(info.id));
            self.target = Some(info);
        } else {
            self.auth = env.auth_policy(None);
        }
        let mut negotiator = Negotiator::new(env.global(), self.session_type);
        if self.tsih != 0 {
            // Adding a connection to an existing session (MC/S): it must be this
            // initiator's, with room for one more connection; it runs with the session's
            // parameters.
            let params = env.session_to_join(self.tsih, &self.session_key(), self.cid)?;
            negotiator.join(params);
        }
        self.negotiator = Some(negotiator);
        Ok(())
    }

    fn session_key(&self) -> SessionKey {
        SessionKey {
            initiator: self
                .initiator_name
                .clone()
                .unwrap_or_default()
                .to_ascii_lowercase(),
            isid: self.isid,
            target: self.target.as_ref().map(|t| t.id),
            pg: self.pg_tag,
        }
    }

    fn complete(&mut self, reply: Vec<u8>, env: &mut dyn TargetEnv) -> LoginStep {
        if let Some(neg) = self.negotiator.as_ref() {
            use crate::tgt::DigestPolicy;
            let (h, d) = neg.digests();
            let g = env.global();
            if (g.header_digest == DigestPolicy::Crc32c && !h)
                || (g.data_digest == DigestPolicy::Crc32c && !d)
            {
                log::warn!(
                    "login from {}: CRC32C digests required, not agreed",
                    self.peer
                );
                return self.fail(LoginStatus::INITIATOR_ERROR);
            }
        }
        let key = self.session_key();
        let Some(neg) = self.negotiator.as_mut() else {
            return self.fail(LoginStatus::TARGET_ERROR);
        };
        let (session, conn) = neg.finish();
        let (tsih, joined) = if self.tsih != 0 {
            match env.join_session(self.tsih, &key, self.cid, self.conn_uid) {
                Ok(j) => (self.tsih, Some(j)),
                Err(status) => return self.fail(status),
            }
        } else {
            // The session's I_T nexus is named after its leading connection.
            match env.register_session(key, self.conn_uid, self.cid, &session, self.conn_uid) {
                Ok(r) => (r.tsih, None),
                Err(status) => return self.fail(status),
            }
        };
        self.window = session_window(self.target.as_ref());
        let bhs = self.respond(true, false, STAGE_FULL_FEATURE, reply.clone(), tsih);
        let est = Established {
            session_type: self.session_type,
            initiator_name: self.initiator_name.clone().unwrap_or_default(),
            initiator_alias: self.initiator_alias.clone(),
            target: self.target.clone(),
            isid: self.isid,
            tsih,
            cid: self.cid,
            session,
            conn,
            exp_cmdsn: self.cmdsn,
            statsn: self.statsn,
            joined,
        };
        LoginStep::Done(bhs, reply, Box::new(est))
    }
}

/// The command window a session starts with: the target's queue depth, or a small one for
/// discovery sessions (which only send Text and Logout).
pub fn session_window(target: Option<&TargetInfo>) -> u32 {
    target.map_or(8, |t| t.queue_depth).max(1)
}
