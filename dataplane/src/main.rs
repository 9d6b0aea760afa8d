//! `iscsi-tgt`: the iSCSI target dataplane.

use dataplane::reactor::Dataplane;
use dataplane::tgt::config;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

const USAGE: &str = "\
usage: iscsi-tgt [--config FILE] [--listen ADDR:PORT] [--cpumask MASK] [--log-level LEVEL]

  --config FILE       TOML configuration (see README: Configuration). Without it the target
                      serves iqn.2026-11.io.iscsi-tgt:default, a 1 GiB RAM LUN, on 127.0.0.1:3260.
  --listen ADDR:PORT  replace the portals of the first portal group with this address
  --cpumask MASK      CPUs to run reactors on, one pinned thread per bit (e.g. 0x3);
                      overrides the configuration's [global] cpumask (default 0x1)
  --instance NAME     name of this dataplane for iscsictl (default: default); its control
                      segment is /dev/shm/iscsi-tgt.NAME
  --log-level LEVEL   error, warn, info (default), debug or trace
  --check             validate the configuration and exit
  --version           print the version and exit
";

struct Args {
    config: Option<PathBuf>,
    listen: Option<String>,
    cpumask: Option<String>,
    instance: Option<String>,
    log_level: Option<String>,
    check: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        config: None,
        listen: None,
        cpumask: None,
        instance: None,
        log_level: None,
        check: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "-c" | "--config" => args.config = Some(PathBuf::from(value("--config")?)),
            "-l" | "--listen" => args.listen = Some(value("--listen")?),
            "--log-level" => args.log_level = Some(value("--log-level")?),
            "-m" | "--cpumask" => args.cpumask = Some(value("--cpumask")?),
            "--instance" => args.instance = Some(value("--instance")?),
            "--check" => args.check = true,
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "-V" | "--version" => {
                let features = if cfg!(feature = "dpdk") {
                    "transports: kernel, tap, dpdk"
                } else {
                    "transports: kernel, tap"
                };
                println!("iscsi-tgt {} ({features})", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // sigaction struct is fully initialised before the call.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // SAFETY: ignoring SIGPIPE is always valid; a peer closing mid-write then yields EPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    dataplane::logger::init(log::LevelFilter::Info);
    let mut cfg = match &args.config {
        Some(path) => config::load_file(path).map_err(|e| e.to_string())?,
        None => config::default_config(args.listen.as_deref()),
    };
    if let (Some(listen), Some(_)) = (&args.listen, &args.config) {
        let addr = listen
            .parse()
            .map_err(|e| format!("--listen {listen}: {e}"))?;
        match cfg.portal_groups.first_mut() {
            Some(pg) => pg.portals = vec![addr],
            None => return Err("--listen given but the configuration has no portal group".into()),
        }
    }
    let level_name = args
        .log_level
        .clone()
        .unwrap_or(cfg.global.log_level.clone());
    let level = dataplane::logger::parse_level(&level_name)
        .ok_or_else(|| format!("unknown log level {level_name:?}"))?;
    dataplane::logger::init(level);
    if let Some(m) = &args.cpumask {
        cfg.global.cpumask = config::parse_cpumask(m)
            .filter(|&m| m != 0)
            .ok_or_else(|| format!("--cpumask {m}: expected a non-zero mask such as 0x3"))?;
    }
    if let Some(name) = &args.instance {
        if !config::valid_instance(name) {
            return Err(format!(
                "--instance {name:?}: 1 to 64 of the characters A-Z a-z 0-9 . _ -"
            ));
        }
        cfg.global.instance = name.clone();
    }
    if args.check {
        dataplane::reactor::check_config(&cfg).map_err(|e| e.to_string())?;
        println!("configuration is valid");
        return Ok(());
    }
    for t in &cfg.targets {
        let luns: Vec<u64> = t.luns.iter().map(|l| l.lun).collect();
        log::info!("target {} with LUNs {:?}", t.name, luns);
    }
    install_signal_handlers();
    let dp = Dataplane::start(cfg, &STOP).map_err(|e| e.to_string())?;
    dp.join().map_err(|e| e.to_string())?;
    log::info!("stopped");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iscsi-tgt: {e}");
            ExitCode::FAILURE
        }
    }
}
