//! The scenarios. Each one reads as its phases: `campaign::setup` (its nodes, subscribers and
//! write load), its own drive phase (the faults, at random moments), `campaign::collect`
//! (stop the load, drain) and `campaign::verify` (the checks). Each is bounded in time by its
//! options and by the caller's overall bound.

mod disk_full;
mod flap;
mod kill;
mod postgres;
mod rabbitmq;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::campaign::{Common, Run};
use crate::node::{Node, NodeSpec, base_env, free_port};
use crate::receiver::Behaviour;
use crate::report::Report;
use crate::subscribers::Plan;

pub use disk_full::{DiskOptions, disk_full};
pub use flap::{FlapOptions, flap};
pub use kill::{KillOptions, kill};
pub use postgres::{PostgresOptions, postgres};
pub use rabbitmq::{RabbitOptions, rabbitmq};

fn rng_for(common: &Common, report: &mut Report) -> StdRng {
    let seed = common.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    report.notes.push(format!(
        "seed {seed} (--seed {seed} repeats the fault moments)"
    ));
    StdRng::seed_from_u64(seed)
}

fn between(rng: &mut StdRng, min: Duration, max: Duration) -> Duration {
    if max <= min {
        return min;
    }
    Duration::from_secs_f64(rng.random_range(min.as_secs_f64()..=max.as_secs_f64()))
}

/// A SQLite node on `data_dir`, with the AMQP channel unless turned off.
fn sqlite_node(common: &Common, run: &Run, data_dir: &Path, amqp: bool) -> anyhow::Result<Node> {
    let mut env = base_env(&run.secret, amqp.then_some(common.amqp_url.as_str()));
    env.push((
        "BATON_DATABASE_URL".into(),
        format!("sqlite://{}", data_dir.join("baton.db").display()),
    ));
    Ok(Node::new(NodeSpec {
        binary: std::path::absolute(&common.binary)?,
        port: free_port()?,
        data_dir: data_dir.to_path_buf(),
        log: run.dir.join("node-1.log"),
        env,
    }))
}

fn check_binary(common: &Common) -> anyhow::Result<()> {
    if !common.binary.is_file() {
        bail!(
            "no Baton binary at {} (cargo build --release --bin baton, or --binary PATH)",
            common.binary.display()
        );
    }
    Ok(())
}

/// The rest-hook receiver of the mixed-load scenarios fails one notification in ten.
fn mixed_plan(common: &Common, amqp: bool) -> Plan {
    Plan {
        rest_hooks: vec![("flaky".into(), Behaviour::Flaky { fail_one_in: 10 }, None)],
        websocket: true,
        amqp: amqp.then(|| common.amqp_url.clone()),
    }
}

/// For each `(fault, repaired)` moment, the time from the fault to the first event of some
/// kind after the repair, counting only events that came before the next fault.
fn since_fault(
    moments: &[(Instant, Instant)],
    first_after: impl Fn(Instant) -> Option<Instant>,
) -> Vec<Duration> {
    recoveries(moments, first_after)
        .into_iter()
        .map(|(fault, _, at)| at - fault)
        .collect()
}

/// As `since_fault`, but timed from the repair.
fn since_repair(
    moments: &[(Instant, Instant)],
    first_after: impl Fn(Instant) -> Option<Instant>,
) -> Vec<Duration> {
    recoveries(moments, first_after)
        .into_iter()
        .map(|(_, repaired, at)| at - repaired)
        .collect()
}

fn recoveries(
    moments: &[(Instant, Instant)],
    first_after: impl Fn(Instant) -> Option<Instant>,
) -> Vec<(Instant, Instant, Instant)> {
    moments
        .iter()
        .enumerate()
        .filter_map(|(i, (fault, repaired))| {
            let at = first_after(*repaired)?;
            let next = moments.get(i + 1).map(|(f, _)| *f);
            (next.is_none_or(|n| at < n)).then_some((*fault, *repaired, at))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recoveries_count_only_events_before_the_next_fault() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Faults at 0 and 1000 ms, each repaired 100 ms later.
        let moments = [(at(0), at(100)), (at(1000), at(1100))];
        // Name, events, then the expected delays in ms from the fault and from the repair.
        type Case = (&'static str, Vec<Instant>, Vec<u128>, Vec<u128>);
        let cases: Vec<Case> = vec![
            (
                "an event after each repair",
                vec![at(150), at(1300)],
                vec![150, 300],
                vec![50, 200],
            ),
            (
                "nothing between the first repair and the next fault",
                vec![at(1300)],
                vec![300],
                vec![200],
            ),
            (
                "an event before the repair does not count",
                vec![at(50)],
                vec![],
                vec![],
            ),
        ];
        for (name, events, from_fault, from_repair) in cases {
            let first_after = |t: Instant| events.iter().copied().find(|e| *e >= t);
            let millis = |d: Vec<Duration>| d.iter().map(Duration::as_millis).collect::<Vec<_>>();
            assert_eq!(
                millis(since_fault(&moments, first_after)),
                from_fault,
                "{name}"
            );
            assert_eq!(
                millis(since_repair(&moments, first_after)),
                from_repair,
                "{name}"
            );
        }
    }
}
