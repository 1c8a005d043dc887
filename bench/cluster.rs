//! The cluster round (issue 16): three pullgate replicas on 127.0.0.11-13 in one `[cluster]`
//! sharing an object store (s3s-fs on loopback, as in the e2e tests), the clients spread over
//! them round robin, as a load balancer would. W5 (20 clients start the same cold 50 MiB blob
//! at once: what the upstream sends for it, and the slowest client), then W2 (16 clients, the
//! blob warm on every replica) with each replica's peak RSS. The figures land in their own
//! column next to the single pullgate's, under the same metric ids, so the report's ratios are
//! cluster ÷ single replica.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use crate::client::Target;
use crate::contestants::Server;
use crate::report::Results;
use crate::support::s3::{self, S3Server};
use crate::{many_over, w5_over, Bed, MIB};

/// The column's id in the results.
pub const ID: &str = "pullgate-cluster";

/// The replicas' last address octets.
const REPLICAS: [u8; 3] = [11, 12, 13];

pub fn round(bed: &Bed, rep: usize, results: &mut Results) -> Result<(), String> {
    let s3s_fs = s3::s3s_fs_bin();
    let found = std::process::Command::new(&s3s_fs)
        .arg("--help")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        return Err(format!(
            "{} not found: bash tests/install-deps.sh builds it",
            s3s_fs.display()
        ));
    }
    let state = bed.run.join(format!("state-cluster-{rep}"));
    std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
    let s3 = S3Server::start(&state);
    let key = state.join("cluster.key");
    std::fs::write(&key, format!("{}\n", "bench-cluster-key-".repeat(3)))
        .map_err(|e| e.to_string())?;
    let addrs: Vec<SocketAddr> = REPLICAS
        .iter()
        .map(|n| free_addr(*n))
        .collect::<Result<_, _>>()?;
    let peers = addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let l2 = s3.l2_table(&state);
    let mut replicas = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let extra = format!(
            "\n{l2}\n[cluster]\npeers = [{peers}]\nadvertise = \"{addr}\"\nkey_file = \"{}\"\n",
            key.display()
        );
        let started = Server::start_replica(
            &bed.env,
            *addr,
            &state.join(format!("replica{i}")),
            &bed.run,
            &extra,
            &[(s3::ACCESS_KEY_ENV, s3::ACCESS_KEY)],
        );
        match started {
            Ok(server) => replicas.push(server),
            Err(e) => {
                replicas.into_iter().for_each(Server::stop);
                return Err(e);
            }
        }
    }
    let measured = measure(bed, &replicas, results);
    replicas.into_iter().for_each(Server::stop);
    drop(s3);
    let _ = std::fs::remove_dir_all(&state);
    measured
}

fn measure(bed: &Bed, replicas: &[Server], results: &mut Results) -> Result<(), String> {
    let targets: Vec<Target> = replicas.iter().map(Server::target).collect();

    // W5: every replica cold, the object store empty.
    w5_over(bed, ID, &targets, results)?;

    // W2: the blob warm on every replica (each kept a verified copy), 16 clients over the 3.
    let mut line = Vec::new();
    for _ in 0..crate::W2_RUNS {
        let (gbps, _) = many_over(&targets, &bed.medium, 16)?;
        results.add("w2_gbps", ID, gbps);
        line.push(format!("{gbps:.2}"));
    }
    let rss = replicas
        .iter()
        .map(|r| r.peak_rss() as f64 / MIB as f64)
        .fold(0.0, f64::max);
    results.add("w6_rss_w2", ID, rss);
    println!(
        "  {ID}: W2 16 × 50 MiB warm over 3 replicas {} GB/s, peak RSS per replica ≤ {rss:.1} MiB",
        line.join(" ")
    );
    Ok(())
}

/// A free port on 127.0.0.`n`.
fn free_addr(n: u8) -> Result<SocketAddr, String> {
    TcpListener::bind((Ipv4Addr::new(127, 0, 0, n), 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("127.0.0.{n}: {e}"))
}
