//! `flap`: a SQLite node whose rest-hook endpoints alternate between accepting and one kind of
//! fault each (refused, 500, 503 Retry-After, a hang past the timeout, slow, reset, or all of
//! them mixed).

use std::time::{Duration, Instant};

use anyhow::Context;
use baton_tools::common::parse_duration;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::{between, check_binary, rng_for, since_repair, sqlite_node};
use crate::campaign::{Common, Rig, Run, collect, setup, verify};
use crate::receiver::Behaviour;
use crate::report::Report;
use crate::subscribers::Plan;

#[derive(clap::Args, Clone, Debug)]
pub struct FlapOptions {
    /// How long the endpoints flap under load.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub flap_duration: Duration,
    /// Shortest phase (up or down) of a flapping endpoint.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub flap_min: Duration,
    /// Longest phase (up or down) of a flapping endpoint.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub flap_max: Duration,
}

/// Each endpoint's label and the faults it flaps between.
fn faults() -> Vec<(&'static str, Vec<Behaviour>)> {
    // The subscriptions' timeout is 2 s: a hang of 4 s outlasts it, 1 s of slowness does not.
    vec![
        ("refuse", vec![Behaviour::Refuse]),
        ("500", vec![Behaviour::Status(500)]),
        ("retry-after", vec![Behaviour::RetryAfter(2)]),
        ("hang", vec![Behaviour::Hang(Duration::from_secs(4))]),
        ("slow", vec![Behaviour::Slow(Duration::from_secs(1))]),
        ("reset", vec![Behaviour::Reset]),
        (
            "mixed",
            vec![
                Behaviour::Refuse,
                Behaviour::Status(502),
                Behaviour::RetryAfter(1),
                Behaviour::Hang(Duration::from_secs(4)),
                Behaviour::Slow(Duration::from_millis(1500)),
                Behaviour::Reset,
            ],
        ),
    ]
}

pub async fn flap(common: &Common, options: &FlapOptions) -> anyhow::Result<Report> {
    check_binary(common)?;
    let run = Run::new("flap", common)?;
    let mut report = Report::new(
        &run,
        format!(
            "SQLite node, rest-hook endpoints flapping for {:.0} s (refuse, 500, 503 Retry-After, hang past the timeout, slow, reset, mixed), retries [1, 2] s",
            options.flap_duration.as_secs_f64()
        ),
    );
    let mut rng = rng_for(common, &mut report);
    let faults = faults();
    let mut node = sqlite_node(common, &run, &run.dir.join("node-1"), false)?;
    let plan = Plan {
        rest_hooks: faults
            .iter()
            .map(|(label, _)| (label.to_string(), Behaviour::Accept, Some(2)))
            .collect(),
        websocket: false,
        amqp: None,
    };
    let nodes = std::slice::from_mut(&mut node);
    let mut rig = setup(&run, common, nodes, plan).await?;
    drive(&mut rig, &faults, options, &mut rng, &mut report).await?;
    let collected = collect(rig, common, &mut report).await?;
    verify(collected, &run, common, &mut report).await?;
    Ok(report)
}

/// Every endpoint flaps on its own random schedule; then how soon each came back into use.
async fn drive(
    rig: &mut Rig<'_>,
    faults: &[(&str, Vec<Behaviour>)],
    options: &FlapOptions,
    rng: &mut StdRng,
    report: &mut Report,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let mut flappers = Vec::new();
    for (rest, (_, behaviours)) in rig.subscribers.rest_hooks.iter().zip(faults) {
        let endpoint = rest.endpoint.clone();
        let behaviours = behaviours.clone();
        let stop = stop.clone();
        let seed: u64 = rng.random();
        let (min, max) = (options.flap_min, options.flap_max);
        flappers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            // (went down, came up) per cycle.
            let mut cycles = Vec::new();
            let mut switches = 0u32;
            while !stop.is_cancelled() {
                tokio::select! {
                    () = tokio::time::sleep(between(&mut rng, min, max)) => {}
                    () = stop.cancelled() => break,
                }
                let fault = behaviours[rng.random_range(0..behaviours.len())];
                let down = Instant::now();
                endpoint.set(fault).await?;
                tokio::select! {
                    () = tokio::time::sleep(between(&mut rng, min, max)) => {}
                    () = stop.cancelled() => {}
                }
                endpoint.set(Behaviour::Accept).await?;
                cycles.push((down, Instant::now()));
                switches += 1;
            }
            endpoint.set(Behaviour::Accept).await?;
            anyhow::Ok((cycles, switches))
        }));
    }
    tokio::time::sleep(options.flap_duration).await;
    stop.cancel();
    let mut recovered = Vec::new();
    for (flapper, rest) in flappers.into_iter().zip(&rig.subscribers.rest_hooks) {
        let (cycles, switches) = flapper.await.context("a flapping endpoint panicked")??;
        let endpoint = rest.endpoint.clone();
        recovered.extend(since_repair(&cycles, |t| endpoint.first_accepted_after(t)));
        report.timeline.push(format!(
            "endpoint {}: {switches} down/up cycles",
            rest.label
        ));
    }
    report.recovery.push((
        "endpoint back up -> first notification accepted".into(),
        recovered,
    ));
    Ok(())
}
