//! The `pullgate` command: `serve`, `check`, `warm`, `client-config`, `dev-certs`,
//! `default-config`.
//!
//! Exit codes follow sysexits: 64 for bad usage, 78 for a bad config, 1 for a failure to run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use pullgate::config::{self, Config};
use pullgate::listen::{ConfigSource, Launch};

const EXIT_USAGE: u8 = 64;
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(name = "pullgate", version, about = "A registry pull-through gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (with no -c: the embedded loopback mirror for docker.io and friends).
    Serve {
        /// Config file (TOML); without it the embedded default runs.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Take the listening sockets over from the pullgate running with the same cache
        /// (a binary upgrade): it stops accepting, finishes its requests and exits.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate config files and print their warnings; exit 78 when one is invalid.
    Check {
        /// Config file (TOML), repeatable; with none the embedded default is checked.
        #[arg(short, long)]
        config: Vec<PathBuf>,
        /// More config files.
        files: Vec<PathBuf>,
        /// Treat warnings as errors.
        #[arg(long)]
        strict: bool,
    },
    /// Write the client side for the gateway a config describes: containerd hosts.toml files,
    /// docker daemon.json keys, or podman/CRI-O registries.conf.
    ClientConfig {
        /// The container runtime to configure.
        client: ClientKind,
        /// Config file (TOML); without it the embedded default.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The URL clients reach the gateway at; default: the first listener (https for TLS).
        #[arg(long)]
        endpoint: Option<String>,
        /// CA certificate (PEM) that signed the gateway's certificate, as clients read it.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// Directory to write the files into (created); without it they are printed.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Warm images into a running pullgate's cache (POST /warm on its admin listener).
    Warm {
        /// Images as clients name them through pullgate: host/repo:tag or host/repo@digest.
        #[arg(required = true)]
        images: Vec<String>,
        /// os/arch[/variant] to take from an index; repeatable. Default: every platform.
        #[arg(long = "platform")]
        platforms: Vec<String>,
        /// Also fetch the images' referrers (signatures, SBOMs, attestations).
        #[arg(long)]
        referrers: bool,
        /// Wait until the job is over, showing its progress; exit 1 when it failed.
        #[arg(long)]
        wait: bool,
        /// The admin listener, host:port. Default: server.admin_listen of -c, else
        /// 127.0.0.1:9090.
        #[arg(long)]
        admin: Option<String>,
        /// Config file whose server.admin_listen to use.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Print the embedded default config.
    DefaultConfig,
    /// The cache encryption keys of a running pullgate, through its admin listener
    /// (`server.admin_listen` of the config): `status` prints them, `rotate` makes a new
    /// generation key at once.
    Keys {
        action: KeysAction,
        /// Config file (TOML) of the running pullgate: where its admin listener is.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The admin listener's address, instead of reading the config.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
    /// Make a development CA and certificates for TLS listeners and mTLS clients (not for
    /// production); reuses the CA already in --out.
    DevCerts {
        /// Directory for ca.crt/ca.key, <name>.crt/.key and client-<id>.crt/.key.
        #[arg(long)]
        out: PathBuf,
        /// DNS name (`*.` wildcards allowed) or IP address for the server certificate;
        /// repeatable.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Base name of the server certificate files.
        #[arg(long, default_value = "server")]
        name: String,
        /// A client identity (CN and DNS SAN) to make a client certificate for; repeatable.
        #[arg(long = "client")]
        clients: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    pullgate::install_crypto_provider();
    match cli.command {
        Command::Serve { config, upgrade } => serve(config, upgrade),
        Command::Check {
            mut config,
            files,
            strict,
        } => {
            config.extend(files);
            if config.is_empty() {
                return check(None, strict);
            }
            let failed = config
                .into_iter()
                .map(|path| check(Some(path), strict))
                .filter(|code| *code != ExitCode::SUCCESS)
                .count();
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_CONFIG)
            }
        }
        Command::ClientConfig {
            client,
            config,
            endpoint,
            ca,
            out,
        } => client_config(client, config, endpoint, ca, out),
        Command::Warm {
            images,
            platforms,
            referrers,
            wait,
            admin,
            config,
        } => {
            let admin = match admin {
                Some(a) => a,
                None => match load(&config) {
                    Ok(c) => match c.server.admin_listen {
                        Some(a) => a.to_string(),
                        None => {
                            eprintln!("pullgate warm: the config has no admin listener (server.admin_listen)");
                            return ExitCode::from(EXIT_USAGE);
                        }
                    },
                    Err(code) => return code,
                },
            };
            let request = serde_json::json!({
                "images": images, "platforms": platforms, "referrers": referrers,
            });
            warm(&admin, request, wait)
        }
        Command::Keys {
            action,
            config,
            admin,
        } => keys(action, config, admin),
        Command::DefaultConfig => {
            print!("{}", config::DEFAULT_TOML);
            ExitCode::SUCCESS
        }
        Command::DevCerts {
            out,
            hosts,
            name,
            clients,
        } => dev_certs(out, hosts, name, clients),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ClientKind {
    /// hosts.toml per registry host plus _default (containerd, `ctr --hosts-dir`, CRI).
    Containerd,
    /// daemon.json registry-mirrors (docker.io only).
    Docker,
    /// registries.conf mirrors by path prefix (podman, CRI-O, skopeo, buildah).
    Podman,
}

fn client_config(
    client: ClientKind,
    path: Option<PathBuf>,
    endpoint: Option<String>,
    ca: Option<PathBuf>,
    out: Option<PathBuf>,
) -> ExitCode {
    use pullgate::client_config::{self as cc, Client};
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let client = match client {
        ClientKind::Containerd => Client::Containerd,
        ClientKind::Docker => Client::Docker,
        ClientKind::Podman => Client::Podman,
    };
    // containerd resolves a relative `ca` against the hosts directory: write absolute paths.
    let ca = ca.map(|p| std::path::absolute(&p).unwrap_or(p));
    let options = cc::Options { endpoint, ca };
    let output = match cc::generate(client, &config, &options) {
        Ok(o) => o,
        Err(e @ cc::Error::Endpoint(_)) => {
            eprintln!("pullgate client-config: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(e) => {
            eprintln!("pullgate client-config: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for note in &output.notes {
        eprintln!("note: {note}");
    }
    match out {
        Some(dir) => {
            for file in &output.files {
                let target = dir.join(&file.path);
                let written = target
                    .parent()
                    .map_or(Ok(()), std::fs::create_dir_all)
                    .and_then(|()| std::fs::write(&target, &file.contents));
                if let Err(e) = written {
                    eprintln!("pullgate client-config: {}: {e}", target.display());
                    return ExitCode::FAILURE;
                }
                println!("{}", target.display());
            }
        }
        None if output.files.len() == 1 => print!("{}", output.files[0].contents),
        None => {
            // Several files: each under a header naming its path, ready to be split by hand.
            for (i, file) in output.files.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                println!("# ==> {} <==", file.path.display());
                print!("{}", file.contents);
            }
        }
    }
    ExitCode::SUCCESS
}

fn dev_certs(out: PathBuf, hosts: Vec<String>, name: String, clients: Vec<String>) -> ExitCode {
    let request = pullgate::listen::dev_certs::Request {
        out,
        hosts,
        name,
        clients,
    };
    match pullgate::listen::dev_certs::generate(&request) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pullgate dev-certs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `pullgate warm`: start a job on the admin listener at `admin`, then (with `wait`) follow
/// it: a progress line redrawn in place on a terminal, a line per change otherwise.
fn warm(admin: &str, request: serde_json::Value, wait: bool) -> ExitCode {
    use std::io::{IsTerminal, Write};
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pullgate warm: {e}");
            return ExitCode::FAILURE;
        }
    };
    let base = if admin.contains("://") {
        admin.trim_end_matches('/').to_owned()
    } else {
        format!("http://{admin}")
    };
    let client = reqwest::Client::builder().no_proxy().build();
    let Ok(client) = client else {
        eprintln!("pullgate warm: cannot make an HTTP client");
        return ExitCode::FAILURE;
    };
    let get_json = |resp: reqwest::Response| async move {
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap_or_default();
        let body = serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default();
        (status, body)
    };
    let started = runtime.block_on(async {
        let resp = client
            .post(format!("{base}/warm"))
            .header("content-type", "application/json")
            .body(request.to_string())
            .send()
            .await?;
        Ok::<_, reqwest::Error>(get_json(resp).await)
    });
    let (status, body) = match started {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("pullgate warm: cannot reach the admin listener at {base}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if status != 202 {
        for e in body["errors"].as_array().into_iter().flatten() {
            eprintln!(
                "pullgate warm: {}: {}",
                e["key"].as_str().unwrap_or("-"),
                e["message"].as_str().unwrap_or("")
            );
        }
        return ExitCode::from(if status == 400 { EXIT_USAGE } else { 1 });
    }
    let id = body["id"].as_str().unwrap_or_default().to_owned();
    println!("warm job {id} started");
    if !wait {
        return ExitCode::SUCCESS;
    }
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let polled = runtime.block_on(async {
            let resp = client.get(format!("{base}/warm/{id}")).send().await?;
            Ok::<_, reqwest::Error>(get_json(resp).await)
        });
        let job = match polled {
            Ok((200, job)) => job,
            Ok((status, _)) => {
                eprintln!("pullgate warm: job {id}: the admin listener answered {status}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("pullgate warm: job {id}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let n = |k: &str| job[k].as_u64().unwrap_or(0);
        let line = format!(
            "manifests {}/{}  blobs {}/{}  {}/{} MiB",
            n("manifests_done"),
            n("manifests_total"),
            n("blobs_done"),
            n("blobs_total"),
            n("bytes_done") >> 20,
            n("bytes_total") >> 20,
        );
        if line != last {
            if tty {
                eprint!("\r\x1b[2K{line}");
                let _ = std::io::stderr().flush();
            } else {
                println!("{line}");
            }
            last = line;
        }
        let state = job["state"].as_str().unwrap_or("running");
        if state != "running" {
            if tty {
                eprintln!();
            }
            for r in job["resolved"].as_array().into_iter().flatten() {
                println!(
                    "{} -> {}",
                    r["image"].as_str().unwrap_or(""),
                    r["digest"].as_str().unwrap_or("")
                );
            }
            for e in job["errors"].as_array().into_iter().flatten() {
                eprintln!("error: {}", e.as_str().unwrap_or(""));
            }
            println!("warm job {id} {state}");
            return if state == "done" {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn load(path: &Option<PathBuf>) -> Result<Config, ExitCode> {
    match path {
        None => Ok(config::embedded_default()),
        Some(p) => config::load(p).map_err(|errors| {
            eprintln!("pullgate: {} is not a valid config:", p.display());
            eprintln!("{errors}");
            ExitCode::from(EXIT_CONFIG)
        }),
    }
}

fn source(path: Option<PathBuf>) -> ConfigSource {
    path.map_or(ConfigSource::Embedded, ConfigSource::File)
}

/// The config of `path` checked as serving (and a reload) would check it: the schema and
/// values, then the certificate files.
fn load_checked(path: &Option<PathBuf>) -> Result<Launch, ExitCode> {
    Launch::load(source(path.clone())).map_err(|errors| {
        let name = path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the embedded default".into());
        eprintln!("pullgate: {name} is not a valid config:");
        for e in errors {
            eprintln!("{e}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

#[derive(Clone, Copy, ValueEnum)]
enum KeysAction {
    Status,
    Rotate,
}

/// `pullgate keys status|rotate`: one HTTP/1.1 request to the admin listener.
fn keys(
    action: KeysAction,
    path: Option<PathBuf>,
    admin: Option<std::net::SocketAddr>,
) -> ExitCode {
    use std::io::{Read, Write};
    let addr = match admin {
        Some(a) => a,
        None => {
            let config = match load_checked(&path) {
                Ok(launch) => launch.checked.config,
                Err(code) => return code,
            };
            match config.server.admin_listen {
                Some(a) => a,
                None => {
                    eprintln!(
                        "server.admin_listen is not set: pullgate keys needs the admin listener"
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
    };
    let (method, target) = match action {
        KeysAction::Status => ("GET", "/-/keys"),
        KeysAction::Rotate => ("POST", "/-/keys/rotate"),
    };
    let answer = (|| -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            stream,
            "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = String::new();
        stream.read_to_string(&mut out)?;
        Ok(out)
    })();
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cannot reach the admin listener at {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let ok = head.split(' ').nth(1).is_some_and(|s| s.starts_with('2'));
    if ok {
        print!("{body}");
        ExitCode::SUCCESS
    } else {
        eprint!("{body}");
        ExitCode::FAILURE
    }
}

fn check(path: Option<PathBuf>, strict: bool) -> ExitCode {
    let config = match load_checked(&path) {
        Ok(launch) => launch.checked.config,
        Err(code) => return code,
    };
    let name = path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the embedded default".into());
    for w in &config.warnings {
        println!("warning: {}: {}", w.key, w.message);
    }
    println!(
        "{name}: ok ({} registries, {} warnings)",
        config.registries.len(),
        config.warnings.len()
    );
    if strict && !config.warnings.is_empty() {
        return ExitCode::from(EXIT_CONFIG);
    }
    ExitCode::SUCCESS
}

fn serve(path: Option<PathBuf>, upgrade: bool) -> ExitCode {
    let mut launch = match load_checked(&path) {
        Ok(l) => l,
        Err(code) => return code,
    };
    launch.upgrade = upgrade;
    let config = Arc::new(launch.checked.config.clone());
    let _logs = pullgate::init_logging(config.server.log_format);
    pullgate::log_warnings(&config);
    for addr in &config.server.listen {
        tracing::info!(%addr, "listening (plain HTTP)");
    }
    for (i, tls) in config.server.tls.iter().enumerate() {
        tracing::info!(
            addr = %tls.listen,
            key = %format!("server.tls[{i}]"),
            client_certificates = match (&tls.client_ca, tls.require_client_cert) {
                (None, _) => "not asked",
                (Some(_), false) => "optional",
                (Some(_), true) => "required",
            },
            "listening (TLS, HTTP/2 and HTTP/1.1)"
        );
    }
    match pullgate::build_server(launch) {
        Ok(server) => {
            // Returns once the drain is over; the services (and with them the audit sink) are
            // dropped by then, and `_logs` writes what is still queued as it goes.
            server.run(pingora::server::RunArgs::default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("pullgate: {e}");
            ExitCode::FAILURE
        }
    }
}
