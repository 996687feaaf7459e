//! `disk-full`: a SQLite node whose data directory is on a small tmpfs, filled while the
//! load runs and then freed. Needs root (or CAP_SYS_ADMIN) to mount the tmpfs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_tools::common::parse_duration;

use super::{check_binary, mixed_plan, sqlite_node};
use crate::campaign::{Common, READY_WAIT, Rig, Run, collect, setup, verify};
use crate::node::Node;
use crate::report::Report;

#[derive(clap::Args, Clone, Debug)]
pub struct DiskOptions {
    /// Size of the tmpfs that holds the node's data directory, in MiB.
    #[arg(long, default_value_t = 48)]
    pub tmpfs_mib: u32,
    /// Load before the disk is filled.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// How long the disk stays full under load.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub full_for: Duration,
    /// How long writes may take to resume once space is freed.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub resume_timeout: Duration,
}

/// A tmpfs mounted for the scenario; unmounted when dropped (the node must be gone by then).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, mib: u32) -> anyhow::Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let output = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .context("running mount")?;
        if !output.status.success() {
            bail!(
                "mount -t tmpfs -o size={mib}m tmpfs {} failed ({}): {}",
                path.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for _ in 0..50 {
            let unmounted = std::process::Command::new("umount")
                .arg(&self.path)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if unmounted {
                let _ = std::fs::remove_dir(&self.path);
                return;
            }
            // A killed node may still be closing its files.
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "baton-fault: could not unmount {}; unmount it by hand",
            self.path.display()
        );
    }
}

/// Writes zeros into `path` until the file system is full; returns the bytes written.
fn fill(path: &Path) -> std::io::Result<u64> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => return Err(e),
        }
    }
    // Whatever is left below a chunk.
    let small = vec![0u8; 512];
    while let Ok(n) = file.write(&small) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    let _ = file.sync_all();
    Ok(written)
}

/// `PRAGMA integrity_check` of a database file; `ok` when sound.
async fn integrity_check(path: &Path) -> anyhow::Result<Vec<String>> {
    use sqlx::Connection;
    use std::str::FromStr;
    let options = sqlx::sqlite::SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .read_only(true);
    let mut connection = sqlx::SqliteConnection::connect_with(&options)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let rows: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut connection)
        .await
        .context("PRAGMA integrity_check")?;
    let _ = connection.close().await;
    Ok(rows)
}

pub async fn disk_full(common: &Common, options: &DiskOptions) -> anyhow::Result<Report> {
    check_binary(common)?;
    let run = Run::new("disk-full", common)?;
    let mount_point = run.dir.join("tmpfs");
    let tmpfs = match Tmpfs::mount(&mount_point, options.tmpfs_mib) {
        Ok(tmpfs) => tmpfs,
        Err(e) => {
            return Ok(Report::incomplete(
                "disk-full",
                format!(
                    "{e:#}; the scenario needs to mount a tmpfs (root or CAP_SYS_ADMIN) and stops here"
                ),
            ));
        }
    };
    let amqp = !common.no_amqp;
    let mut report = Report::new(
        &run,
        format!(
            "SQLite node on a {} MiB tmpfs, mixed load, disk filled for {:.0} s, then space freed",
            options.tmpfs_mib,
            options.full_for.as_secs_f64()
        ),
    );
    let data_dir = tmpfs.path.join("node-1");
    let mut node = sqlite_node(common, &run, &data_dir, amqp)?;
    let outcome = disk_full_run(common, options, &run, &mut report, &mut node, &tmpfs.path).await;
    // The node goes before its file system does.
    let _ = node.kill9().await;
    if outcome.is_ok() {
        match integrity_check(&data_dir.join("baton.db")).await {
            Ok(rows) if rows == ["ok"] => report
                .notes
                .push("PRAGMA integrity_check after the run: ok".into()),
            Ok(rows) => report.failures.push(format!(
                "PRAGMA integrity_check after the run: {}",
                rows.join("; ")
            )),
            Err(e) => report
                .failures
                .push(format!("PRAGMA integrity_check could not run: {e:#}")),
        }
    }
    drop(tmpfs);
    outcome?;
    Ok(report)
}

async fn disk_full_run(
    common: &Common,
    options: &DiskOptions,
    run: &Run,
    report: &mut Report,
    node: &mut Node,
    mount_point: &Path,
) -> anyhow::Result<()> {
    let plan = mixed_plan(common, !common.no_amqp);
    let mut rig = setup(run, common, std::slice::from_mut(node), plan).await?;
    drive(&mut rig, options, run, report, mount_point).await?;
    let collected = collect(rig, common, report).await?;
    verify(collected, run, common, report).await
}

/// Load, then a full disk probed once a second, then space freed; writes must resume.
async fn drive(
    rig: &mut Rig<'_>,
    options: &DiskOptions,
    run: &Run,
    report: &mut Report,
    mount_point: &Path,
) -> anyhow::Result<()> {
    let (root, base) = (rig.nodes[0].root(), rig.nodes[0].base());
    tokio::time::sleep(options.warmup).await;

    let filler = mount_point.join("filler");
    let filling = Instant::now();
    let bytes = {
        let filler = filler.clone();
        tokio::task::spawn_blocking(move || fill(&filler)).await??
    };
    let full = Instant::now();
    report.timeline.push(format!(
        "disk filled at {:.1} s ({:.1} MiB of zeros in {:.2} s)",
        (filling - run.started).as_secs_f64(),
        bytes as f64 / 1048576.0,
        (full - filling).as_secs_f64()
    ));
    // While full: what /readyz, /healthz and a read say, once a second.
    let mut probes: BTreeMap<String, u32> = BTreeMap::new();
    let until = full + options.full_for;
    while Instant::now() < until {
        let readyz = rig.api.readyz(&root).await.map(|(s, _)| s);
        let healthz = rig
            .api
            .client
            .get(format!("{root}/healthz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok();
        let read = rig
            .api
            .client
            .get(format!("{base}/Task?_count=1"))
            .header(reqwest::header::AUTHORIZATION, &rig.api.bearer)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .ok();
        let key = format!(
            "/readyz {}, /healthz {}, search {}",
            readyz.map_or("no answer".into(), |s| s.to_string()),
            healthz.map_or("no answer".into(), |s| s.to_string()),
            read.map_or("no answer".into(), |s| s.to_string())
        );
        *probes.entry(key).or_default() += 1;
        if let Some(status) = rig.nodes[0].exited() {
            report.failures.push(format!(
                "the node exited while the disk was full ({status})"
            ));
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let freeing = Instant::now();
    std::fs::remove_file(&filler).context("removing the filler file")?;
    let freed = Instant::now();
    for (probe, count) in &probes {
        report
            .notes
            .push(format!("while full, {count} probe(s) saw: {probe}"));
    }
    let refused = rig.load.log.failures_between(full, freeing);
    let acked_while_full = rig.load.log.acks_between(full, freeing);
    report.timeline.push(format!(
        "space freed at {:.1} s; while full: {acked_while_full} writes acknowledged, refused: {refused:?}",
        (freeing - run.started).as_secs_f64()
    ));
    for (kind, count) in &refused {
        let acceptable =
            kind == "HTTP 507 (OperationOutcome)" || kind == "HTTP 503 (OperationOutcome)";
        if !acceptable {
            report.failures.push(format!(
                "{count} writes answered '{kind}' while the disk was full (expected 507 or 503 with an OperationOutcome)"
            ));
        }
    }
    if refused.is_empty() && acked_while_full > 0 {
        report.notes.push(
            "no write was refused while the disk was full: SQLite still found room (free pages, WAL)".into(),
        );
    }
    // Writes must resume once there is space again.
    let deadline = freed + options.resume_timeout;
    let mut resumed = None;
    while Instant::now() < deadline {
        if let Some(at) = rig.load.log.first_ack_after(freed) {
            resumed = Some(at - freed);
            break;
        }
        if rig.nodes[0].exited().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match resumed {
        Some(d) => report
            .recovery
            .push(("space freed -> next acknowledged write".into(), vec![d])),
        None => {
            let after = rig.load.log.failures_between(freed, Instant::now());
            let readyz = rig.api.readyz(&root).await;
            report.failures.push(format!(
                "writes did not resume within {:.0} s of freeing space; meanwhile writes got {after:?}; /readyz: {}; process {}",
                options.resume_timeout.as_secs_f64(),
                readyz.map_or("no answer".into(), |(s, b)| format!("{s} {b}")),
                if rig.nodes[0].is_running() { "still running" } else { "gone" }
            ));
            report
                .notes
                .push("the node was killed and restarted to check the rest".into());
            let node = &mut rig.nodes[0];
            node.kill9().await?;
            let restarted = Instant::now();
            node.start(&rig.api.client, READY_WAIT).await?;
            report.timeline.push(format!(
                "node restarted at {:.1} s to continue",
                (restarted - run.started).as_secs_f64()
            ));
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(())
}
