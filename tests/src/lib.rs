//! Helpers shared by the end-to-end tests.
//!
//! * locating the built `iscsi-tgt` binary and the libiscsi-enabled fio,
//! * picking free loopback ports,
//! * [`Target`]: a guard that runs one `iscsi-tgt` instance on its own port and
//!   stops it (SIGTERM, then SIGKILL) when dropped,
//! * [`run_with_timeout`]: run an external command with a hard time limit,
//! * pure parsers for the output of `iscsi-test-cu` and of fio's terse output.
//!
//! Harness debugging: with `E2E_EXTERNAL_PORTAL=127.0.0.1:3262`,
//! `E2E_EXTERNAL_IQN=iqn...` and optionally `E2E_EXTERNAL_LUN=1`, [`Target::start`]
//! does not spawn anything and points the tests at an already running target
//! (e.g. tgtd). Target-specific exact assertions are relaxed in that mode.

pub mod raw;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// Name of the target `iscsi-tgt` serves when started without a config.
pub const DEFAULT_IQN: &str = "iqn.2026-11.io.iscsi-tgt:default";
/// LUN of the default 1 GiB malloc disk.
pub const DEFAULT_LUN: u32 = 0;
/// Size of the default LUN.
pub const DEFAULT_LUN_BYTES: u64 = 1 << 30;
/// How long a freshly spawned target gets to accept TCP connections.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a target gets to exit after SIGTERM before it is SIGKILLed.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------ paths

/// Root of the cargo workspace (the parent of this crate).
/// A configuration with `global` lines under `[global]`, one kernel portal group
/// (127.0.0.1:3260; the harness's `--listen` moves it), an initiator group for everyone, and
/// the bdev `bdev_toml` (a `[[bdev]]` table named `bdev_name`) as LUN 0 of [`DEFAULT_IQN`].
pub fn one_lun_config(global: &str, bdev_toml: &str, bdev_name: &str) -> String {
    format!(
        r#"
[global]
{global}

[[portal_group]]
tag = 1
portals = ["127.0.0.1:3260"]

[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["ANY"]

{bdev_toml}

[[target]]
name = "{DEFAULT_IQN}"
luns = [ {{ lun = 0, bdev = "{bdev_name}" }} ]
mappings = [ {{ portal_group = 1, initiator_group = 1 }} ]
"#
    )
}

/// A `[[bdev]]` table for a RAM disk.
pub fn malloc_bdev(name: &str, size: &str) -> String {
    format!("[[bdev]]\nname = \"{name}\"\ntype = \"malloc\"\nsize = \"{size}\"")
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Directory for logs and scratch files of the e2e tests: `target/e2e/`.
pub fn artifacts_dir() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("e2e");
    fs::create_dir_all(&dir).expect("create target/e2e");
    dir
}

/// The `iscsi-tgt` binary under test: `$ISCSI_TGT_BIN`, else
/// `target/release/iscsi-tgt`, else `target/debug/iscsi-tgt`.
pub fn target_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ISCSI_TGT_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "ISCSI_TGT_BIN={} is not a file", p.display());
        return p;
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    for profile in ["release", "debug"] {
        let p = target_dir.join(profile).join("iscsi-tgt");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "iscsi-tgt binary not found under {}/{{release,debug}}: run \
         `cargo build --release --workspace` (or set ISCSI_TGT_BIN)",
        target_dir.display()
    );
}

/// The `iscsictl` binary built beside `iscsi-tgt`.
pub fn ctl_bin() -> PathBuf {
    let p = target_bin().with_file_name("iscsictl");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build --release --workspace`",
        p.display()
    );
    p
}

/// The fio built with the libiscsi engine by `scripts/deps.sh`.
pub fn fio_bin() -> PathBuf {
    let p = workspace_root().join(".deps/bin/fio");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/deps.sh (builds fio with the libiscsi engine)",
        p.display()
    );
    p
}

/// fio's `filename=` for the libiscsi engine: every `:` must be escaped as `\:`
/// (fio splits filenames on `:`), including the one inside the IQN.
pub fn fio_iscsi_filename(portal: &str, iqn: &str, lun: u32) -> String {
    format!("iscsi://{portal}/{iqn}/{lun}").replace(':', "\\:")
}

// ------------------------------------------------------------------ ports

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback TCP port that is free right now and was not handed out before in
/// this process (tests of one binary run in parallel threads).
pub fn free_port() -> u16 {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let used = guard.get_or_insert_with(HashSet::new);
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        drop(l);
        if used.insert(port) {
            return port;
        }
    }
    panic!("could not find a free loopback port in 100 attempts");
}

/// Wait until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    false
}

// ------------------------------------------------------------------ commands

/// Result of [`run_with_timeout`].
#[derive(Debug)]
pub struct CmdOutput {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub elapsed: Duration,
    pub command: String,
}

impl CmdOutput {
    /// Exit code, `None` if killed by a signal or timed out.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    pub fn success(&self) -> bool {
        !self.timed_out && self.status.map(|s| s.success()).unwrap_or(false)
    }

    /// Panic with the full output unless the command exited with status 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "command failed:\n{self}");
        self
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "$ {}", self.command)?;
        writeln!(
            f,
            "status: {:?}  timed_out: {}  elapsed: {:.1?}",
            self.status, self.timed_out, self.elapsed
        )?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn send_signal(pid: u32, signal: &str, group: bool) {
    let target = if group {
        format!("-{pid}")
    } else {
        pid.to_string()
    };
    let _ = Command::new("kill")
        .args([format!("-{signal}"), "--".to_string(), target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Process groups of commands still running under [`run_with_timeout`].
static RUNNING_GROUPS: Mutex<Option<HashSet<u32>>> = Mutex::new(None);

extern "C" fn kill_running_groups() {
    if let Ok(mut g) = RUNNING_GROUPS.try_lock() {
        for pgid in g.take().unwrap_or_default() {
            // SAFETY: kill(2) on a process group this process created.
            unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGKILL) };
        }
    }
}

/// Remembers a running process group, so that a test binary exiting early (a panicking
/// test leaves its background fio running) kills it instead of leaving it behind (fio's
/// libiscsi engine retries a vanished target forever, spinning a core).
fn track_group(pgid: u32, running: bool) {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: registering a plain extern "C" function.
        unsafe { libc::atexit(kill_running_groups) };
    });
    let mut g = RUNNING_GROUPS.lock().unwrap_or_else(|e| e.into_inner());
    let set = g.get_or_insert_with(HashSet::new);
    if running {
        set.insert(pgid);
    } else {
        set.remove(&pgid);
    }
}

/// Run `cmd` (in its own process group) with stdout/stderr captured; on expiry
/// of `timeout` the whole process group is SIGKILLed and `timed_out` is set. A group
/// still running when the test binary exits is killed then.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let command = describe(cmd);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{command}`: {e}"));
    track_group(child.id(), true);
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = start + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                send_signal(child.id(), "KILL", true);
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for `{command}`: {e}"),
        }
    };
    // Descendants that inherited the pipes could keep the readers blocked.
    if timed_out {
        send_signal(child.id(), "KILL", true);
    }
    track_group(child.id(), false);
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    CmdOutput {
        status: if timed_out { None } else { status },
        stdout,
        stderr,
        timed_out,
        elapsed: start.elapsed(),
        command,
    }
}

// ------------------------------------------------------------------ target

/// One running target; stopped on drop (SIGTERM, bounded wait, then SIGKILL).
pub struct Target {
    child: Option<Child>,
    addr: SocketAddr,
    iqn: String,
    lun: u32,
    log: Option<PathBuf>,
    external: bool,
}

impl Target {
    /// Start `iscsi-tgt` with its built-in default config on a free port.
    /// `name` labels the log directory (`target/e2e/<name>-<port>/`).
    pub fn start(name: &str) -> Target {
        if let Some(t) = Self::external() {
            return t;
        }
        Self::spawn_with_retries(name, None, &[], None)
    }

    /// Start `iscsi-tgt` with its built-in default config plus extra command-line
    /// arguments (e.g. `["--cpumask", "0x3"]`).
    pub fn start_with_args(name: &str, args: &[&str]) -> Target {
        if let Some(t) = Self::external() {
            return t;
        }
        Self::spawn_with_retries(name, None, args, None)
    }

    /// Start `iscsi-tgt --config <dir>/config.toml` (plus `--listen` on a free
    /// port). `iqn`/`lun` say which LUN the test talks to.
    pub fn start_with_config(name: &str, toml: &str, iqn: &str, lun: u32) -> Target {
        let mut t = Self::spawn_with_retries(name, Some(toml), &[], None);
        t.iqn = iqn.to_string();
        t.lun = lun;
        t
    }

    /// Start `iscsi-tgt --config` inside network namespace `ns`, serving `portal` (an
    /// address of the namespace, e.g. a userspace stack's on a TAP interface). No
    /// `--listen`: the configuration's portals are used as they are.
    pub fn start_in_netns(
        name: &str,
        ns: &NetNs,
        toml: &str,
        portal: SocketAddr,
        iqn: &str,
        lun: u32,
        args: &[&str],
    ) -> Target {
        let mut t = Self::spawn_with_retries(name, Some(toml), args, Some((ns, portal)));
        t.iqn = iqn.to_string();
        t.lun = lun;
        t
    }

    fn external() -> Option<Target> {
        let portal = std::env::var("E2E_EXTERNAL_PORTAL").ok()?;
        let iqn = std::env::var("E2E_EXTERNAL_IQN")
            .expect("E2E_EXTERNAL_PORTAL needs E2E_EXTERNAL_IQN as well");
        let lun = std::env::var("E2E_EXTERNAL_LUN")
            .map(|s| s.parse().expect("E2E_EXTERNAL_LUN is a number"))
            .unwrap_or(0);
        let addr: SocketAddr = portal.parse().expect("E2E_EXTERNAL_PORTAL is ip:port");
        assert!(
            wait_for_port(addr, STARTUP_TIMEOUT),
            "external target {addr} does not accept connections"
        );
        Some(Target {
            child: None,
            addr,
            iqn,
            lun,
            log: None,
            external: true,
        })
    }

    fn spawn_with_retries(
        name: &str,
        toml: Option<&str>,
        args: &[&str],
        ns: Option<(&NetNs, SocketAddr)>,
    ) -> Target {
        let mut last_err = String::new();
        // A port picked by free_port() can be grabbed by someone else before
        // the target binds it; retry a few times with fresh ports.
        for _ in 0..3 {
            match Self::spawn_once(name, toml, args, ns) {
                Ok(t) => return t,
                Err(e) => last_err = e,
            }
        }
        panic!("iscsi-tgt did not start:\n{last_err}");
    }

    fn spawn_once(
        name: &str,
        toml: Option<&str>,
        args: &[&str],
        ns: Option<(&NetNs, SocketAddr)>,
    ) -> Result<Target, String> {
        let bin = target_bin();
        let port = free_port();
        let addr: SocketAddr = match ns {
            Some((_, portal)) => portal,
            None => format!("127.0.0.1:{port}").parse().unwrap(),
        };
        let dir = artifacts_dir().join(format!("{name}-{port}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let log = dir.join("iscsi-tgt.log");
        let log_file = File::create(&log).map_err(|e| format!("create log: {e}"))?;
        let log_err = log_file.try_clone().map_err(|e| e.to_string())?;

        let mut cmd = match ns {
            // `ip netns exec` execs the target: the child's pid is the target's.
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.name()]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        if let Some(toml) = toml {
            let cfg = dir.join("config.toml");
            fs::write(&cfg, toml).map_err(|e| format!("write {}: {e}", cfg.display()))?;
            cmd.arg("--config").arg(&cfg);
        }
        if ns.is_none() {
            cmd.arg("--listen").arg(addr.to_string());
        }
        cmd.arg("--log-level")
            .arg(std::env::var("E2E_LOG_LEVEL").unwrap_or_else(|_| "info".into()))
            // Each target its own control segment: tests run targets side by side.
            .arg("--instance")
            .arg(format!("e2e-{port}"))
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err))
            .process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "{} exited during startup with {status}; log {}:\n{}",
                    describe(&cmd),
                    log.display(),
                    fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            let up = match ns {
                Some((ns, _)) => ns.can_connect(addr),
                None => TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok(),
            };
            if up {
                break;
            }
            if Instant::now() >= deadline {
                send_signal(child.id(), "KILL", true);
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not accept connections on {addr} within {STARTUP_TIMEOUT:?}; log {}:\n{}",
                    describe(&cmd),
                    log.display(),
                    fs::read_to_string(&log).unwrap_or_default()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Target {
            child: Some(child),
            addr,
            iqn: DEFAULT_IQN.to_string(),
            lun: DEFAULT_LUN,
            log: Some(log),
            external: false,
        })
    }

    /// True when pointed at an externally managed target (E2E_EXTERNAL_*).
    pub fn is_external(&self) -> bool {
        self.external
    }
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    /// `127.0.0.1:PORT`
    pub fn portal(&self) -> String {
        self.addr.to_string()
    }
    pub fn iqn(&self) -> &str {
        &self.iqn
    }
    pub fn lun(&self) -> u32 {
        self.lun
    }
    /// `iscsi://127.0.0.1:PORT` (for discovery).
    pub fn portal_url(&self) -> String {
        format!("iscsi://{}", self.addr)
    }
    /// `iscsi://127.0.0.1:PORT/<iqn>/<lun>`
    pub fn lun_url(&self) -> String {
        format!("iscsi://{}/{}/{}", self.addr, self.iqn, self.lun)
    }
    /// fio `filename=` for this LUN (colons escaped).
    pub fn fio_filename(&self) -> String {
        fio_iscsi_filename(&self.portal(), &self.iqn, self.lun)
    }
    /// Path of the target's combined stdout/stderr log (None when external).
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }
    pub fn log_contents(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Panic (with the log) if the target process has died.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "iscsi-tgt on {} died with {status}; log:\n{}",
                    self.addr,
                    self.log_contents()
                );
            }
        }
    }

    /// Stop the target: SIGTERM, wait up to [`SHUTDOWN_TIMEOUT`], then SIGKILL.
    /// Returns the exit status and whether it exited on its own after SIGTERM.
    pub fn stop(&mut self) -> Option<(ExitStatus, bool)> {
        let mut child = self.child.take()?;
        if let Ok(Some(s)) = child.try_wait() {
            return Some((s, false));
        }
        send_signal(child.id(), "TERM", false);
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                return Some((s, true));
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "iscsi-tgt on {} ignored SIGTERM for {SHUTDOWN_TIMEOUT:?}; SIGKILL",
            self.addr
        );
        send_signal(child.id(), "KILL", true);
        let _ = child.kill();
        child.wait().ok().map(|s| (s, false))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

// ------------------------------------------------------------------ network namespaces

/// A network namespace of the test's own, deleted (with its interfaces) when dropped.
pub struct NetNs {
    name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = run_with_timeout(Command::new("ip").args(args), Duration::from_secs(10));
    if out.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}{}",
            args.join(" "),
            out.stdout,
            out.stderr
        ))
    }
}

impl NetNs {
    /// Creates `<prefix>-<pid>-<n>` with its loopback up. Err when namespaces cannot be
    /// made here (not root, no iproute2): callers skip with that message.
    pub fn new(prefix: &str) -> Result<NetNs, String> {
        static N: Mutex<u32> = Mutex::new(0);
        let n = {
            let mut g = N.lock().unwrap_or_else(|e| e.into_inner());
            *g += 1;
            *g
        };
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A persistent TAP interface `dev` in the namespace with `host_cidr` on the kernel
    /// side, up.
    pub fn add_tap(&self, dev: &str, host_cidr: &str) -> Result<(), String> {
        self.exec_ok(&["ip", "tuntap", "add", "dev", dev, "mode", "tap"])?;
        self.exec_ok(&["ip", "addr", "add", host_cidr, "dev", dev])?;
        self.exec_ok(&["ip", "link", "set", dev, "up"])
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    fn exec_ok(&self, argv: &[&str]) -> Result<(), String> {
        let mut c = self.command(argv[0]);
        c.args(&argv[1..]);
        let out = run_with_timeout(&mut c, Duration::from_secs(10));
        if out.success() {
            Ok(())
        } else {
            Err(format!("{}: {}{}", argv.join(" "), out.stdout, out.stderr))
        }
    }

    /// Whether a TCP connection to `addr` from inside the namespace succeeds.
    pub fn can_connect(&self, addr: SocketAddr) -> bool {
        let probe = format!(
            "exec 3<>/dev/tcp/{}/{}",
            addr.ip().to_string().trim_matches(['[', ']']),
            addr.port()
        );
        let mut c = self.command("timeout");
        c.args(["2", "bash", "-c", &probe]);
        run_with_timeout(&mut c, Duration::from_secs(5)).success()
    }
}

/// The link between the kernel side of a namespace and the target's userspace stack.
#[derive(Debug, Clone, Copy)]
pub enum Wire {
    /// A persistent TAP interface; the stack attaches to it (`transport = "tap"`).
    Tap { dev: &'static str },
    /// A veth pair: `kernel` carries the kernel side's address, DPDK's `net_af_packet`
    /// drives `dpdk` (`transport = "dpdk"`).
    /// `queues` > 1: AF_PACKET fanout spreads flows over that many queues, one stack per
    /// reactor.
    DpdkVeth {
        kernel: &'static str,
        dpdk: &'static str,
        queues: u8,
    },
}

impl NetNs {
    /// Sets up `wire` with `host_cidr` on its kernel side.
    pub fn add_wire(&self, wire: &Wire, host_cidr: &str) -> Result<(), String> {
        match *wire {
            Wire::Tap { dev } => self.add_tap(dev, host_cidr),
            Wire::DpdkVeth { kernel, dpdk, .. } => {
                self.exec_ok(&[
                    "ip", "link", "add", kernel, "type", "veth", "peer", "name", dpdk,
                ])?;
                self.exec_ok(&["ip", "addr", "add", host_cidr, "dev", kernel])?;
                // Frames sent by the kernel must carry real checksums: AF_PACKET hands DPDK
                // the raw frame, without the "checksum to be filled in" note.
                for dev in [kernel, dpdk] {
                    self.exec_ok(&["ethtool", "-K", dev, "tx", "off", "rx", "off"])?;
                    self.exec_ok(&["ip", "link", "set", dev, "up"])?;
                }
                Ok(())
            }
        }
    }
}

/// A `[[portal_group]]` (tag 1, portal 10.`net`.0.2:3260) served by the userspace stack on
/// `wire`, with `extra` lines in its `[portal_group.userspace]` table, and for DPDK the
/// `[dpdk]` table (no hugepages, `net_af_packet` on the wire's DPDK end).
pub fn userspace_portal_group(wire: &Wire, net: u8, extra: &str) -> String {
    let (transport, device, dpdk) = match *wire {
        Wire::Tap { dev } => ("tap", dev.to_string(), String::new()),
        Wire::DpdkVeth { dpdk, queues, .. } => (
            "dpdk",
            "net_af_packet0".to_string(),
            format!(
                "\n[dpdk]\nno_huge = true\nmemory_mib = 256\n\
                 eal_args = [\"--no-pci\", \"--vdev=net_af_packet0,iface={dpdk},qpairs={queues}\"]\n"
            ),
        ),
    };
    format!(
        "[[portal_group]]\ntag = 1\nportals = [\"10.{net}.0.2:3260\"]\ntransport = \"{transport}\"\n\
         [portal_group.userspace]\ndevice = \"{device}\"\naddresses = [\"10.{net}.0.2/24\"]\n{extra}{dpdk}"
    )
}

/// Whether the built `iscsi-tgt` has the DPDK transport. With `E2E_REQUIRE_DPDK=1` (CI
/// builds with `--features dpdk`) a binary without it fails the test instead.
pub fn dpdk_available() -> bool {
    let out = run_with_timeout(
        Command::new(target_bin()).arg("--version"),
        Duration::from_secs(10),
    );
    let has = out.stdout.contains("dpdk");
    if !has {
        assert!(
            std::env::var("E2E_REQUIRE_DPDK").as_deref() != Ok("1"),
            "E2E_REQUIRE_DPDK=1 but {} has no DPDK transport: {}",
            target_bin().display(),
            out.stdout.trim()
        );
        eprintln!("skipped: iscsi-tgt was built without the dpdk feature");
    }
    has
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

// ------------------------------------------------------------------ iscsi-test-cu

/// Outcome of one CUnit test as printed by `iscsi-test-cu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
}

/// One test from an `iscsi-test-cu` run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CuTest {
    /// Full name as `iscsi-test-cu -l` prints it, e.g. `ALL.Read10.Simple`.
    pub name: String,
    pub outcome: Outcome,
    /// The test printed `[SKIPPED]` (CUnit still counts it as passed).
    pub skipped: bool,
    /// Lines the test printed (notes, `[SKIPPED]`/`[FAILED]` messages, failed asserts).
    pub output: Vec<String>,
}

/// One row of CUnit's "Run Summary" table; `None` where CUnit prints `n/a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CuSummaryRow {
    pub total: u64,
    pub ran: u64,
    pub passed: Option<u64>,
    pub failed: u64,
    pub inactive: Option<u64>,
}

/// Parsed `iscsi-test-cu` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CuReport {
    pub tests: Vec<CuTest>,
    pub suites: CuSummaryRow,
    pub summary: CuSummaryRow,
    pub asserts: CuSummaryRow,
}

impl CuReport {
    pub fn get(&self, name: &str) -> Option<&CuTest> {
        self.tests.iter().find(|t| t.name == name)
    }
    pub fn failed(&self) -> impl Iterator<Item = &CuTest> {
        self.tests.iter().filter(|t| t.outcome == Outcome::Failed)
    }
    pub fn skipped(&self) -> impl Iterator<Item = &CuTest> {
        self.tests.iter().filter(|t| t.skipped)
    }
    /// Passed and not skipped.
    pub fn really_passed(&self) -> impl Iterator<Item = &CuTest> {
        self.tests
            .iter()
            .filter(|t| t.outcome == Outcome::Passed && !t.skipped)
    }
}

fn is_assert_detail(line: &str) -> bool {
    // "    1. test_foo.c:38  - CU_ASSERT_EQUAL(_r,0)"
    let t = line.trim_start();
    let Some((num, rest)) = t.split_once(". ") else {
        return false;
    };
    !num.is_empty()
        && num.bytes().all(|b| b.is_ascii_digit())
        && line.starts_with("    ")
        && rest.contains(".c:")
        && rest.contains("  - ")
}

fn parse_summary_row(line: &str) -> Result<CuSummaryRow, String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() != 6 {
        return Err(format!("bad Run Summary row: {line:?}"));
    }
    let num = |s: &str| -> Result<u64, String> {
        s.parse()
            .map_err(|_| format!("bad number {s:?} in Run Summary row {line:?}"))
    };
    let opt = |s: &str| -> Result<Option<u64>, String> {
        if s == "n/a" {
            Ok(None)
        } else {
            num(s).map(Some)
        }
    };
    Ok(CuSummaryRow {
        total: num(f[1])?,
        ran: num(f[2])?,
        passed: opt(f[3])?,
        failed: num(f[4])?,
        inactive: opt(f[5])?,
    })
}

/// Parse the console output (CUnit "basic" mode, the default `-v`) of
/// `iscsi-test-cu -t <family> ...`. Test names are `<family>.<Suite>.<Test>`.
///
/// Format (libiscsi 1.19, CUnit 2.1-3):
/// ```text
/// Suite: Read10
///   Test: Simple ...passed
///   Test: BeyondEol ...    [FAILED] READ10 successful but should have failed ...
/// FAILED
///     1. test_read10_beyond_eol.c:38  - CU_ASSERT_EQUAL(_r,0)
///   Test: Unwritten ...    [SKIPPED] Logical unit is fully provisioned. Skipping test
/// passed
/// ...
/// Run Summary:    Type  Total    Ran Passed Failed Inactive
///               suites     51     51    n/a      0        0
///                tests    230    230    222      8        0
///              asserts  54457  54457  54446     11      n/a
/// ```
/// The result word (`passed`/`FAILED`) ends the last line the test printed
/// before its failed-assert details. Errors if no test is found, a test has no
/// result, names repeat, the summary is missing or disagrees with the tests.
pub fn parse_iscsi_test_cu(output: &str, family: &str) -> Result<CuReport, String> {
    struct Block {
        name: String,
        lines: Vec<String>,
    }
    let mut blocks: Vec<Block> = Vec::new();
    let mut suite: Option<String> = None;
    let mut rows: BTreeMap<String, CuSummaryRow> = BTreeMap::new();
    let mut in_summary = false;

    for raw in output.lines() {
        let line = raw.trim_end();
        if in_summary {
            let t = line.trim_start();
            if let Some(kind) = t.split_whitespace().next() {
                if matches!(kind, "suites" | "tests" | "asserts") {
                    rows.insert(kind.to_string(), parse_summary_row(t)?);
                    continue;
                }
            }
            if rows.len() == 3 {
                in_summary = false;
            }
            continue;
        }
        if let Some(s) = line.strip_prefix("Suite: ") {
            suite = Some(s.trim().to_string());
            blocks.push(Block {
                name: String::new(),
                lines: Vec::new(),
            }); // separator: suite header ends the previous test's block
            continue;
        }
        if line.starts_with("Run Summary:") {
            in_summary = true;
            blocks.push(Block {
                name: String::new(),
                lines: Vec::new(),
            });
            continue;
        }
        if let Some(rest) = line.strip_prefix("  Test: ") {
            let suite = suite
                .as_deref()
                .ok_or_else(|| format!("test line before any Suite line: {line:?}"))?;
            let (tname, after) = rest
                .split_once(" ...")
                .ok_or_else(|| format!("test line without ' ...': {line:?}"))?;
            blocks.push(Block {
                name: format!("{family}.{suite}.{tname}"),
                lines: vec![after.to_string()],
            });
            continue;
        }
        if let Some(b) = blocks.last_mut() {
            if !b.name.is_empty() {
                b.lines.push(line.to_string());
            }
        }
    }

    let mut tests = Vec::new();
    let mut seen = HashSet::new();
    for b in blocks.into_iter().filter(|b| !b.name.is_empty()) {
        // Usually the result word starts a line (the test's own output ends
        // with a newline, or it printed nothing: "Test: X ...passed"); text
        // printed by suite teardown may follow it on the same line. If the test
        // printed output without a trailing newline, the word ends that line.
        let starts = |l: &str, w: &str| {
            l.strip_prefix(w)
                .is_some_and(|r| r.is_empty() || r.starts_with(char::is_whitespace))
        };
        let result_at = b
            .lines
            .iter()
            .position(|l| starts(l, "passed") || starts(l, "FAILED"));
        // Only what the test printed before its result word is its own: text after the
        // word on that line comes from the next suite's setup (e.g. its PR clean-up
        // "[SKIPPED] PERSISTENT RESERVE IN is not implemented.").
        let own_lines = &b.lines[..result_at.unwrap_or(b.lines.len())];
        let skipped = own_lines.iter().any(|l| l.contains("[SKIPPED]"));
        let outcome = if let Some(l) = result_at.map(|i| &b.lines[i]) {
            if starts(l, "passed") {
                Outcome::Passed
            } else {
                Outcome::Failed
            }
        } else {
            let last = b
                .lines
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty() && !is_assert_detail(l))
                .ok_or_else(|| format!("{}: no result line", b.name))?;
            if last.ends_with("passed") {
                Outcome::Passed
            } else if last.ends_with("FAILED") {
                Outcome::Failed
            } else {
                return Err(format!(
                    "{}: cannot find passed/FAILED (last line {last:?})",
                    b.name
                ));
            }
        };
        if !seen.insert(b.name.clone()) {
            return Err(format!("test {} appears twice", b.name));
        }
        let output = b
            .lines
            .iter()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty() && l != "passed" && l != "FAILED")
            .collect();
        tests.push(CuTest {
            name: b.name,
            outcome,
            skipped,
            output,
        });
    }

    if tests.is_empty() {
        return Err("no tests found in iscsi-test-cu output".into());
    }
    let get = |k: &str| {
        rows.get(k)
            .copied()
            .ok_or_else(|| format!("Run Summary row {k:?} missing (run incomplete?)"))
    };
    let report = CuReport {
        suites: get("suites")?,
        summary: get("tests")?,
        asserts: get("asserts")?,
        tests,
    };
    let n = report.tests.len() as u64;
    let nfailed = report.failed().count() as u64;
    if report.summary.ran != n {
        return Err(format!(
            "Run Summary says {} tests ran but {n} test results were parsed",
            report.summary.ran
        ));
    }
    if report.summary.failed != nfailed {
        return Err(format!(
            "Run Summary says {} tests failed but {nfailed} FAILED results were parsed",
            report.summary.failed
        ));
    }
    if report.summary.passed != Some(n - nfailed) {
        return Err(format!(
            "Run Summary passed column {:?} != parsed {}",
            report.summary.passed,
            n - nfailed
        ));
    }
    Ok(report)
}

/// Parse `tests/claimed-tests.txt`: one full test name per line
/// (`ALL.Suite.Test`), `#` starts a comment, blank lines ignored.
pub fn parse_claimed(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.split('.').count() != 3 || line.contains(char::is_whitespace) {
            return Err(format!(
                "claimed-tests.txt:{}: {line:?} is not a FAMILY.Suite.Test name",
                i + 1
            ));
        }
        if !seen.insert(line.to_string()) {
            return Err(format!("claimed-tests.txt:{}: {line} listed twice", i + 1));
        }
        out.push(line.to_string());
    }
    Ok(out)
}

// ------------------------------------------------------------------ fio

/// Per-job numbers from fio's `--output-format=terse --terse-version=3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FioJob {
    pub name: String,
    pub error: i64,
    /// KiB read (with verify: the read-back of what was written).
    pub read_kib: u64,
    /// KiB written.
    pub write_kib: u64,
}

/// Parse fio terse v3 output: one `3;fio-X;job;group;error;read...;write...` line
/// per job (other lines, e.g. warnings, are ignored). Field 4 is the job's
/// error, 5 the read KiB, 46 the write KiB (0-based).
pub fn parse_fio_terse(text: &str) -> Result<Vec<FioJob>, String> {
    let mut jobs = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("3;")) {
        let f: Vec<&str> = line.split(';').collect();
        if f.len() < 100 {
            return Err(format!(
                "fio terse line has {} fields, expected >= 100: {line}",
                f.len()
            ));
        }
        let num = |i: usize| -> Result<u64, String> {
            f[i].parse()
                .map_err(|_| format!("fio terse field {i} = {:?} not a number", f[i]))
        };
        jobs.push(FioJob {
            name: f[2].to_string(),
            error: f[4]
                .parse()
                .map_err(|_| format!("fio terse error field {:?}", f[4]))?,
            read_kib: num(5)?,
            write_kib: num(46)?,
        });
    }
    if jobs.is_empty() {
        return Err(format!("no fio terse v3 job lines in:\n{text}"));
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TGTD_FULL: &str = include_str!("../data/iscsi-test-cu-tgtd.txt");
    const SAMPLE: &str = include_str!("../data/iscsi-test-cu-sample.txt");

    #[test]
    fn parses_full_tgtd_run() {
        let r = parse_iscsi_test_cu(TGTD_FULL, "ALL").unwrap();
        assert_eq!(r.tests.len(), 230);
        assert_eq!(
            r.summary,
            CuSummaryRow {
                total: 230,
                ran: 230,
                passed: Some(222),
                failed: 8,
                inactive: Some(0)
            }
        );
        assert_eq!(
            r.suites,
            CuSummaryRow {
                total: 51,
                ran: 51,
                passed: None,
                failed: 0,
                inactive: Some(0)
            }
        );
        assert_eq!(r.asserts.failed, 11);
        assert_eq!(r.asserts.inactive, None);
        let failed: Vec<&str> = r.failed().map(|t| t.name.as_str()).collect();
        assert_eq!(
            failed,
            [
                "ALL.GetLBAStatus.BeyondEol",
                "ALL.PrinServiceactionRange.Range",
                "ALL.ProutReserve.OwnershipEA",
                "ALL.ProutReserve.OwnershipWE",
                "ALL.ProutReserve.OwnershipEARO",
                "ALL.ProutReserve.OwnershipWERO",
                "ALL.Reserve6.2Initiators",
                "ALL.iSCSIdatasn.iSCSIDataSnInvalid",
            ]
        );
        assert_eq!(r.skipped().count(), 62);
        // "Test: LUNReset ...passed    [FAILED] PRIN ..." (teardown noise after the result)
        assert_eq!(
            r.get("ALL.Reserve6.LUNReset").unwrap().outcome,
            Outcome::Passed
        );
        assert!(r.get("ALL.CompareAndWrite.Simple").unwrap().skipped);
        let read10 = r.get("ALL.Read10.Simple").unwrap();
        assert_eq!(read10.outcome, Outcome::Passed);
        assert!(!read10.skipped);
        assert_eq!(r.really_passed().count(), 222 - 62);
    }

    #[test]
    fn parses_sample_with_multiline_output() {
        let r = parse_iscsi_test_cu(SAMPLE, "ALL").unwrap();
        let names: Vec<(&str, Outcome, bool)> = r
            .tests
            .iter()
            .map(|t| (t.name.as_str(), t.outcome, t.skipped))
            .collect();
        assert_eq!(
            names,
            [
                ("ALL.CompareAndWrite.Simple", Outcome::Passed, true),
                ("ALL.GetLBAStatus.Simple", Outcome::Passed, false),
                ("ALL.GetLBAStatus.BeyondEol", Outcome::Failed, false),
                ("ALL.Reserve6.Simple", Outcome::Passed, false),
                ("ALL.Reserve6.2Initiators", Outcome::Failed, false),
                ("ALL.Reserve6.Logout", Outcome::Passed, false),
                ("ALL.iSCSIdatasn.iSCSIDataSnInvalid", Outcome::Failed, false),
            ]
        );
        let t = r.get("ALL.iSCSIdatasn.iSCSIDataSnInvalid").unwrap();
        assert_eq!(t.output.len(), 4, "{t:?}");
        assert_eq!(r.summary.failed, 3);
    }

    #[test]
    fn rejects_empty_and_truncated_output() {
        assert!(parse_iscsi_test_cu("", "ALL").is_err());
        assert!(parse_iscsi_test_cu("\n\n     CUnit - A unit testing framework\n", "ALL").is_err());
        // Cut before the summary (e.g. crash or timeout).
        let cut = &SAMPLE[..SAMPLE.find("Run Summary").unwrap()];
        let e = parse_iscsi_test_cu(cut, "ALL").unwrap_err();
        assert!(e.contains("Run Summary"), "{e}");
        // Cut in the middle of a test.
        let cut = &SAMPLE[..SAMPLE.find("  Test: Logout").unwrap() + 20];
        assert!(parse_iscsi_test_cu(cut, "ALL").is_err());
    }

    #[test]
    fn rejects_summary_disagreeing_with_tests() {
        let doctored = SAMPLE.replace("FAILED\n    1. test_get_lba", "passed\n    1. test_get_lba");
        assert_ne!(doctored, SAMPLE);
        let e = parse_iscsi_test_cu(&doctored, "ALL").unwrap_err();
        assert!(e.contains("failed"), "{e}");
    }

    #[test]
    fn next_suite_setup_text_is_not_the_previous_tests_skip() {
        let out = "Suite: A\n  Test: One ...passed    [SKIPPED] PERSISTENT RESERVE IN is not implemented.\n\
Suite: B\n  Test: Two ...    [SKIPPED] Not here. Skipping test\npassed\n\
Run Summary:    Type  Total    Ran Passed Failed Inactive\n\
              suites      2      2    n/a      0        0\n\
               tests      2      2      2      0        0\n\
             asserts      2      2      2      0      n/a\n";
        let r = parse_iscsi_test_cu(out, "ALL").unwrap();
        assert!(!r.get("ALL.A.One").unwrap().skipped);
        assert!(r.get("ALL.B.Two").unwrap().skipped);
        assert_eq!(r.really_passed().count(), 1);
    }

    #[test]
    fn claimed_list() {
        let text = "# header\n\nALL.Read10.Simple  # comment\nALL.Inquiry.Standard\n";
        assert_eq!(
            parse_claimed(text).unwrap(),
            ["ALL.Read10.Simple", "ALL.Inquiry.Standard"]
        );
        assert!(parse_claimed("Read10.Simple\n").is_err());
        assert!(parse_claimed("ALL.A.B\nALL.A.B\n").is_err());
        assert!(parse_claimed("# only comments\n").unwrap().is_empty());
    }

    #[test]
    fn committed_claimed_list_is_well_formed() {
        let text = fs::read_to_string(workspace_root().join("tests/claimed-tests.txt")).unwrap();
        parse_claimed(&text).unwrap();
    }

    #[test]
    fn fio_filename_escapes_every_colon() {
        assert_eq!(
            fio_iscsi_filename("127.0.0.1:3260", DEFAULT_IQN, 0),
            r"iscsi\://127.0.0.1\:3260/iqn.2026-11.io.iscsi-tgt\:default/0"
        );
    }

    #[test]
    fn fio_terse() {
        let text = include_str!("../data/fio-terse-v3.txt");
        let jobs = parse_fio_terse(text).unwrap();
        assert_eq!(jobs.len(), 2);
        for j in &jobs {
            assert_eq!(j.name, "verify");
            assert_eq!(j.error, 0);
            assert_eq!(j.read_kib, 8192);
            assert_eq!(j.write_kib, 8192);
        }
        assert!(parse_fio_terse("fio: some warning\n").is_err());
    }

    #[test]
    fn run_with_timeout_kills() {
        let o = run_with_timeout(
            Command::new("sh").args(["-c", "echo hi; sleep 30"]),
            Duration::from_millis(300),
        );
        assert!(o.timed_out);
        assert!(!o.success());
        assert_eq!(o.stdout, "hi\n");
        assert!(o.elapsed < Duration::from_secs(5), "{:?}", o.elapsed);

        let o = run_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        );
        assert!(!o.timed_out);
        assert_eq!(o.code(), Some(3));
        assert_eq!((o.stdout.as_str(), o.stderr.as_str()), ("out\n", "err\n"));
    }

    #[test]
    fn free_ports_are_distinct() {
        let a: HashSet<u16> = (0..20).map(|_| free_port()).collect();
        assert_eq!(a.len(), 20);
    }
}
