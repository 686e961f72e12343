//! `ployzctl migrate ...`

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use ployz::agent::{RESOLVE_ANNOTATION, human_bytes};
use ployz::api::Machine;
use ployz::api::{CutoverStep, Migration, MigrationStatus, Phase};
use ployz::manifest::{Format, MigrationRequest};
use ployz::names::{MachineName, ServiceRef};
use ployz::plan::{self, observe::observe};
use serde_json::json;

use crate::cli::{MigrationArgs, OutputArg, Target};
use crate::cluster::explain;
use crate::error::CliError;
use crate::output;

const KIND: &str = "migration.ployz.dev";

impl MigrationArgs {
    fn to_request(&self, workload: &ServiceRef, to: &MachineName) -> MigrationRequest {
        MigrationRequest {
            workload: workload.clone(),
            to: to.clone(),
            from: self.from.clone(),
            name: self.name.clone(),
            bandwidth_limit: self.bandwidth_limit.clone().map(Quantity),
            compression: self.compression.map(Into::into),
            source_copy: self.source_copy.map(Into::into),
        }
    }
}

/// Builds the Migration and checks it against the CRD's own CEL rules, so a manifest that the
/// API server would refuse fails here, with the server's message, before anyone applies it.
pub fn build(
    args: &MigrationArgs,
    workload: &ServiceRef,
    to: &MachineName,
) -> Result<Migration, CliError> {
    let migration = args
        .to_request(workload, to)
        .to_migration()
        .map_err(CliError::usage)?;
    migration.validate_cel().map_err(|errs| {
        let reasons: Vec<String> = errs.into_vec().iter().map(ToString::to_string).collect();
        CliError::Usage(format!(
            "the manifest would be refused: {}",
            reasons.join("; ")
        ))
    })?;
    Ok(migration)
}

/// `migrate render-manifest`: print the Migration (YAML unless `-o` says otherwise).
pub fn render_manifest(
    args: &MigrationArgs,
    workload: &ServiceRef,
    out: Option<OutputArg>,
) -> Result<String, CliError> {
    let to = match &args.to {
        Target::Name(n) => n,
        Target::Address(a) => {
            return Err(CliError::Usage(format!(
                "--to {a}: render-manifest needs no cluster, so it cannot resolve an address; give the machine's name (`ployzctl machine ls -o wide` shows each machine's endpoint)"
            )));
        }
    };
    let m = build(args, workload, to)?;
    match out {
        Some(OutputArg::Name) => Ok(output::names(KIND, [m.name_any().as_str()])),
        Some(OutputArg::Json) => output::object(&m, Format::Json),
        _ => output::object(&m, Format::Yaml),
    }
}

/// The name a new Migration gets from `apply`: `--name`, else the server completes
/// `SERVICE-to-MACHINE-` with a random suffix, so the same workload can move back and forth
/// any number of times (render-manifest keeps the suffix-free name, for GitOps).
fn generated(mut m: Migration, args: &MigrationArgs) -> Migration {
    if args.name.is_none() {
        name_each_move(&mut m);
    }
    m
}

/// `SERVICE-to-MACHINE` becomes the prefix the server completes with a random suffix.
pub fn name_each_move(m: &mut Migration) {
    m.metadata.generate_name = m.metadata.name.take().map(|n| format!("{n}-"));
}

/// The machine `--to` names: by name, or the one machine publishing that address (its
/// agent's endpoint, or an address of its node).
async fn target(client: &Client, to: &Target) -> Result<MachineName, CliError> {
    let ip = match to {
        Target::Name(n) => return Ok(n.clone()),
        Target::Address(ip) => *ip,
    };
    let machines: Api<Machine> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    let machines = machines
        .list(&ListParams::default())
        .await
        .map_err(explain)?
        .items;
    let nodes = nodes
        .list(&ListParams::default())
        .await
        .map_err(explain)?
        .items;
    let matching: Vec<String> = machines
        .iter()
        .filter(|m| {
            let endpoint = m
                .spec
                .endpoint
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|e| e.ip() == ip);
            let node = nodes
                .iter()
                .filter(|n| n.metadata.name.as_deref() == Some(m.spec.node_name.as_str()))
                .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
                .any(|a| a.address.parse::<std::net::IpAddr>() == Ok(ip));
            endpoint || node
        })
        .map(ResourceExt::name_any)
        .collect();
    match matching.as_slice() {
        [one] => one
            .parse()
            .map_err(|e| CliError::Failed(anyhow::anyhow!("{e}"))),
        [] => Err(CliError::Failed(anyhow::anyhow!(
            "--to {ip}: no machine publishes this address; `ployzctl machine ls -o wide` shows each machine's endpoint"
        ))),
        many => Err(CliError::Failed(anyhow::anyhow!(
            "--to {ip}: machines {} all publish this address; give the machine's name",
            many.join(", ")
        ))),
    }
}

fn display_name(m: &Migration) -> String {
    match (&m.metadata.name, &m.metadata.generate_name) {
        (Some(n), _) => n.clone(),
        (None, Some(prefix)) => format!("{prefix}xxxxx"),
        (None, None) => String::new(),
    }
}

pub fn openebs_namespace() -> String {
    std::env::var("PLOYZ_OPENEBS_NAMESPACE").unwrap_or_else(|_| "openebs".into())
}

/// `migrate preview`: the controller's planner, run here against the live cluster.
pub async fn preview(
    client: Client,
    args: &MigrationArgs,
    workload: &ServiceRef,
    out: Option<OutputArg>,
) -> Result<String, CliError> {
    let to = target(&client, &args.to).await?;
    let mut migration = generated(build(args, workload, &to)?, args);
    // Newest of all: an older unfinished Migration of the same workload wins, as it would.
    migration.metadata.creation_timestamp = Some(Time(Timestamp::now()));
    let ns = workload.namespace.clone();
    let name = display_name(&migration);
    let obs = observe(&client, &ns, &openebs_namespace())
        .await
        .map_err(explain)?;
    let planned = plan::plan(&obs, &migration)
        .map_err(|e| CliError::Failed(anyhow::anyhow!("{} ({})", e.message, e.reason.as_str())))?;
    let target = obs
        .machines
        .iter()
        .find(|m| m.name_any() == planned.plan.target);
    let free = target.and_then(|m| m.status.as_ref()?.free.clone());
    if let Some(format) = output::format(out) {
        let value = json!({
            "migration": format!("{ns}/{name}"),
            "plan": planned.plan,
            "replicas": planned.workload.replicas,
            "targetFreeBytes": target.and_then(|m| m.status.as_ref()?.free_bytes),
        });
        return output::object(&value, format);
    }
    if out == Some(OutputArg::Name) {
        return Ok(output::names(KIND, [name.as_str()]));
    }
    let p = &planned.plan;
    let mut text = format!("Migration {ns}/{name} (dry run: nothing was changed)\n");
    let _ = writeln!(
        text,
        "  workload  {} {ns}/{} ({} replica(s), stopped only during the cutover)",
        p.workload.kind, p.workload.name, planned.workload.replicas
    );
    let _ = writeln!(text, "  from      {}", p.source);
    let _ = writeln!(
        text,
        "  to        {} (free: {})",
        p.target,
        free.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(text, "  volumes   {}", p.volumes.len());
    let rows: Vec<Vec<String>> = p
        .volumes
        .iter()
        .map(|v| {
            vec![
                format!("    {}", v.claim),
                format!("{}:{}", p.source, v.source_dataset),
                "->".into(),
                format!("{}:{}", p.target, v.target_dataset),
            ]
        })
        .collect();
    let table = output::table(&["    CLAIM", "FROM", "", "TO"], &rows)?;
    text.push_str(&table);
    text.push_str(
        "  transfer  a full send the first time; only the delta since the last common snapshot when the target holds a ployz replica\n",
    );
    Ok(text)
}

/// `migrate apply`: create the Migration, then follow it.
pub async fn apply(
    client: Client,
    args: &MigrationArgs,
    workload: &ServiceRef,
    no_wait: bool,
    out: Option<OutputArg>,
) -> Result<String, CliError> {
    let to = target(&client, &args.to).await?;
    let migration = generated(build(args, workload, &to)?, args);
    let ns = workload.namespace.clone();
    let api: Api<Migration> = Api::namespaced(client, &ns);
    let created = match api.create(&PostParams::default(), &migration).await {
        Ok(m) => m,
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let name = display_name(&migration);
            return Err(CliError::Failed(anyhow::anyhow!(
                "Migration {ns}/{name} already exists; follow it with `ployzctl migrate watch {ns}/{name}`, pick another --name, or leave --name out to get a new one"
            )));
        }
        Err(e) => return Err(explain(e).into()),
    };
    let name = created.name_any();
    if out == Some(OutputArg::Name) {
        // Scripts get the generated name at once, on its own line.
        println!("{KIND}/{name}");
    } else if out.is_none() {
        eprintln!("{KIND}/{name} created");
    }
    if no_wait {
        return Ok(match out {
            Some(OutputArg::Json) => {
                format!(
                    "{}\n",
                    json!({"migration": format!("{ns}/{name}"), "created": true})
                )
            }
            Some(OutputArg::Yaml) => output::object(&created, Format::Yaml)?,
            Some(OutputArg::Name) => String::new(),
            _ => format!("follow it with `ployzctl migrate watch {ns}/{name}`\n"),
        });
    }
    follow(api, &name, out).await
}

/// `migrate watch`: follow an existing Migration.
pub async fn watch(
    client: Client,
    m: &ServiceRef,
    out: Option<OutputArg>,
) -> Result<String, CliError> {
    let api: Api<Migration> = Api::namespaced(client, &m.namespace);
    // A Migration that is not there would otherwise be waited for forever.
    existing(&api, m).await?;
    follow(api, &m.service, out).await
}

/// The Migration `r` names, or an error that says how to list them.
async fn existing(api: &Api<Migration>, r: &ServiceRef) -> Result<Migration, CliError> {
    api.get_opt(&r.service)
        .await
        .map_err(explain)?
        .ok_or_else(|| not_found(r))
}

fn not_found(m: &ServiceRef) -> CliError {
    CliError::Failed(anyhow::anyhow!(
        "there is no Migration {m}; list them with `ployzctl migrate ls -n {}`",
        m.namespace
    ))
}

/// Prints phase changes and progress as they happen; ends with the Migration's outcome
/// (success when the workload runs on the target).
pub async fn follow(
    api: Api<Migration>,
    name: &str,
    out: Option<OutputArg>,
) -> Result<String, CliError> {
    follow_until(api, name, out, |s| s.phase == Some(Phase::Succeeded)).await
}

/// One line of `-o json` output while following: a JSON object per event, flushed at once.
fn emit(value: &serde_json::Value) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{value}");
    let _ = stdout.flush();
}

fn bytes_sent(s: &MigrationStatus) -> Option<u64> {
    s.pre_copy
        .as_ref()
        .map(|p| p.pass_bytes.iter().sum::<u64>())
}

/// Where human progress goes: a bar redrawn in place on a terminal (bytes, percentage, rate
/// and time left, as the agent reports them in status), plain lines when stderr is piped.
struct Reporter {
    bar: Option<ProgressBar>,
}

impl Reporter {
    fn new(human: bool) -> Self {
        let bar = (human && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{bar:30}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self { bar }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    /// Returns whether a plain line was printed (a bar redraws in place instead).
    fn progress(&self, p: &ployz::api::Progress) -> bool {
        let summary = p.summary.clone().unwrap_or_default();
        match &self.bar {
            Some(bar) => {
                bar.set_length(p.bytes_estimated.unwrap_or(0).max(p.bytes_sent));
                bar.set_position(p.bytes_sent);
                bar.set_message(summary);
                false
            }
            None => {
                eprintln!("          {summary}");
                true
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// [`follow`], with the outcome that counts as success. Human output goes to stderr as it
/// happens and the result to stdout; `-o json` prints one object per event on stdout (type
/// `Phase`, `Progress`, then `Result`), the result also when the Migration failed.
async fn follow_until(
    api: Api<Migration>,
    name: &str,
    out: Option<OutputArg>,
    success: impl Fn(&MigrationStatus) -> bool,
) -> Result<String, CliError> {
    let json = out == Some(OutputArg::Json);
    let human = out.is_none() || out == Some(OutputArg::Wide);
    let stream = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .applied_objects();
    futures::pin_mut!(stream);
    let mut printed = 0;
    let mut last_progress: Option<(String, Instant)> = None;
    let mut start: Option<Timestamp> = None;
    let reporter = Reporter::new(human);
    while let Some(m) = stream.try_next().await? {
        let key = format!("{}/{name}", m.namespace().unwrap_or_default());
        let s = m.status.clone().unwrap_or_default();
        let t0 = *start.get_or_insert_with(|| {
            m.metadata
                .creation_timestamp
                .clone()
                .map_or_else(Timestamp::now, |t| t.0)
        });
        let seen = printed;
        for t in s.phase_transitions.iter().skip(printed) {
            printed += 1;
            let current = s.phase == Some(t.phase);
            let (reason, message) = if current {
                (s.reason.clone(), s.message.clone())
            } else {
                (None, None)
            };
            if json {
                emit(&json!({
                    "type": "Phase", "migration": key, "phase": t.phase, "time": t.time,
                    "reason": reason, "message": message,
                }));
            } else if human {
                let at = t.time.0.duration_since(t0).as_secs_f64();
                let why = match (reason, message) {
                    (Some(r), Some(m)) => format!("{r}: {m}"),
                    (Some(r), None) => r,
                    (None, Some(m)) => m,
                    (None, None) => String::new(),
                };
                reporter.line(&format!(
                    "{at:>7.1}s  {:<13} {why}",
                    format!("{:?}", t.phase)
                ));
            }
        }
        if let Some(p) = s.progress.as_ref()
            && printed == seen
            && matches!(s.phase, Some(Phase::Sending | Phase::CuttingOver))
        {
            let summary = p.summary.clone().unwrap_or_default();
            let due = last_progress
                .as_ref()
                .is_none_or(|(old, at)| *old != summary && at.elapsed() >= Duration::from_secs(1));
            if due {
                if json {
                    emit(&json!({
                        "type": "Progress", "migration": key, "phase": s.phase,
                        "bytesSent": p.bytes_sent, "bytesEstimated": p.bytes_estimated,
                        "bytesPerSecond": p.bytes_per_second, "etaSeconds": p.eta_seconds,
                        "summary": p.summary,
                    }));
                    last_progress = Some((summary, Instant::now()));
                } else if human && reporter.progress(p) {
                    last_progress = Some((summary, Instant::now()));
                }
            }
        }
        let Some(phase) = s.phase.filter(|p| p.is_terminal()) else {
            continue;
        };
        reporter.finish();
        let ok = success(&s);
        let text = match out {
            Some(OutputArg::Json) => {
                emit(&json!({
                    "type": "Result", "migration": key, "succeeded": ok, "phase": phase,
                    "reason": s.reason, "message": s.message,
                    "downtimeMilliseconds": s.downtime_milliseconds,
                    "bytesSent": bytes_sent(&s), "status": s,
                }));
                String::new()
            }
            Some(OutputArg::Yaml) => output::object(&m, Format::Yaml)?,
            Some(OutputArg::Name) => String::new(),
            _ => {
                let mut line = format!("{key}: {phase:?}");
                if let Some(ms) = s.downtime_milliseconds {
                    let _ = write!(line, ", downtime {:.1}s", ms as f64 / 1000.0);
                }
                if let Some(sent) = bytes_sent(&s) {
                    let _ = write!(line, ", {} sent", human_bytes(sent));
                }
                line.push('\n');
                line
            }
        };
        if ok {
            return Ok(text);
        }
        // The result is printed (-o yaml) before the failure is reported.
        print!("{text}");
        return Err(CliError::Failed(anyhow::anyhow!(
            "{key} {phase:?} ({}): {}; details: `ployzctl migrate describe {key}`",
            s.reason.unwrap_or_default(),
            s.message.unwrap_or_default()
        )));
    }
    Err(CliError::Failed(anyhow::anyhow!(
        "Migration {name} disappeared before it ended"
    )))
}

/// `migrate ls`: Migrations in one namespace (or all), oldest first.
pub async fn ls(
    client: Client,
    namespace: Option<&str>,
    out: Option<OutputArg>,
) -> Result<String, CliError> {
    let api: Api<Migration> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let mut items = api
        .list(&ListParams::default())
        .await
        .map_err(explain)?
        .items;
    items.sort_by_key(|m| {
        (
            m.metadata.creation_timestamp.clone().map(|t| t.0),
            m.name_any(),
        )
    });
    if let Some(printed) = output::scripted(KIND, &items, out) {
        return printed;
    }
    if items.is_empty() {
        let r#where = namespace.map_or("any namespace".to_string(), |ns| {
            format!("namespace {ns} (all namespaces: -A)")
        });
        return Ok(format!("No Migrations in {}.\n", r#where));
    }
    let wide = out == Some(OutputArg::Wide);
    let now = Timestamp::now();
    let mut header = vec![
        "NAME", "SERVICE", "FROM", "TO", "PHASE", "REASON", "DOWNTIME", "AGE",
    ];
    if namespace.is_none() {
        header.insert(0, "NAMESPACE");
    }
    if wide {
        header.extend(["SENT", "PROGRESS", "MESSAGE"]);
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|m| {
            let s = m.status.clone().unwrap_or_default();
            let mut row = vec![
                m.name_any(),
                m.spec.service.clone(),
                s.plan.as_ref().map_or("-".into(), |p| p.source.clone()),
                m.spec.to.clone(),
                s.phase.map_or("Pending".into(), |p| format!("{p:?}")),
                s.reason.clone().unwrap_or_else(|| "-".into()),
                s.downtime_milliseconds
                    .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
                m.metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or("-".into(), |t| {
                        output::age(now.duration_since(t.0).as_secs())
                    }),
            ];
            if namespace.is_none() {
                row.insert(0, m.namespace().unwrap_or_default());
            }
            if wide {
                row.push(bytes_sent(&s).map_or("-".into(), human_bytes));
                row.push(
                    s.progress
                        .as_ref()
                        .and_then(|p| p.summary.clone())
                        .unwrap_or_else(|| "-".into()),
                );
                row.push(s.message.clone().unwrap_or_default());
            }
            row
        })
        .collect();
    output::table(&header, &rows)
}

/// `migrate describe`: everything about one Migration, and what to do next.
pub async fn describe(
    client: Client,
    r: &ServiceRef,
    out: Option<OutputArg>,
) -> Result<String, CliError> {
    let api: Api<Migration> = Api::namespaced(client.clone(), &r.namespace);
    let m = existing(&api, r).await?;
    if let Some(format) = output::format(out) {
        return output::object(&m, format);
    }
    if out == Some(OutputArg::Name) {
        return Ok(output::names(KIND, [m.name_any().as_str()]));
    }
    let events: Api<Event> = Api::namespaced(client, &r.namespace);
    let mut events: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .map_err(explain)?
        .items
        .into_iter()
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|o| o.kind.as_deref() == Some("Migration") && o.uid == m.metadata.uid)
        })
        .collect();
    events.sort_by_key(event_time);
    Ok(describe_text(&m, &events, Timestamp::now()))
}

fn event_time(e: &Event) -> Option<Timestamp> {
    e.event_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| e.deprecated_last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}

/// `describe`'s text, from the object and its events (pure, for tests).
pub fn describe_text(m: &Migration, events: &[Event], now: Timestamp) -> String {
    let s = m.status.clone().unwrap_or_default();
    let ns = m.namespace().unwrap_or_default();
    let key = format!("{ns}/{}", m.name_any());
    let phase = s.phase.unwrap_or(Phase::Pending);
    let created = m.metadata.creation_timestamp.as_ref().map(|t| t.0);
    let mut o = String::new();
    let field = |o: &mut String, k: &str, v: &str| {
        let _ = writeln!(o, "{:<13}{v}", format!("{k}:"));
    };
    field(&mut o, "Name", &m.name_any());
    field(&mut o, "Namespace", &ns);
    let workload = s.plan.as_ref().map_or(m.spec.service.clone(), |p| {
        format!(
            "{} {} (service {})",
            p.workload.kind, p.workload.name, m.spec.service
        )
    });
    field(&mut o, "Workload", &workload);
    field(
        &mut o,
        "From",
        s.plan
            .as_ref()
            .map_or("(not planned yet)", |p| p.source.as_str()),
    );
    field(&mut o, "To", &m.spec.to);
    let mut state = format!("{phase:?}");
    if let Some(r) = &s.reason {
        let _ = write!(state, " ({r})");
    }
    field(&mut o, "Phase", &state);
    if let Some(msg) = &s.message {
        field(&mut o, "Message", msg);
    }
    if let Some(by) = &s.taken_over_by {
        field(&mut o, "Taken over", &format!("by the agent of {by}"));
    }
    if let Some(c) = created {
        field(
            &mut o,
            "Created",
            &format!("{c} ({} ago)", output::age(now.duration_since(c).as_secs())),
        );
    }
    if let Some(ms) = s.downtime_milliseconds {
        field(&mut o, "Downtime", &format!("{:.1}s", ms as f64 / 1000.0));
    }
    if let Some(p) = &s.pre_copy {
        let passes: Vec<String> = p.pass_bytes.iter().map(|b| human_bytes(*b)).collect();
        field(
            &mut o,
            "Sent",
            &format!(
                "{} in {} pass(es): {}",
                human_bytes(p.pass_bytes.iter().sum()),
                p.pass_bytes.len(),
                passes.join(", ")
            ),
        );
    }
    if let Some(p) = s.progress.as_ref().and_then(|p| p.summary.clone())
        && !phase.is_terminal()
    {
        field(&mut o, "Progress", &p);
    }
    if let Some(c) = &s.cutover {
        field(&mut o, "Cutover", &format!("{:?}", c.step));
    }
    if let Some(c) = s.cutover.as_ref().filter(|c| !c.steps.is_empty()) {
        // Where the downtime went: each step from the start of the scale-down.
        o.push_str("Cutover steps:\n");
        for t in &c.steps {
            let at = t.at.0.duration_since(c.started.0).as_secs_f64();
            let _ = writeln!(o, "  {at:>7.2}s  {:?}", t.step);
        }
        if let Some(ms) = s.downtime_milliseconds {
            let _ = writeln!(o, "  {:>7.2}s  Ready", ms as f64 / 1000.0);
        }
    }
    if let Some(p) = &s.plan {
        o.push_str("Volumes:\n");
        let rows: Vec<Vec<String>> = p
            .volumes
            .iter()
            .map(|v| {
                vec![
                    format!("  {}", v.claim),
                    v.volume.clone(),
                    format!("{}:{}", p.source, v.source_dataset),
                    format!("{}:{}", p.target, v.target_dataset),
                    v.base
                        .clone()
                        .map_or("full".into(), |b| format!("from {b}")),
                ]
            })
            .collect();
        let header = ["  CLAIM", "VOLUME", "FROM", "TO", "SEND"];
        o.push_str(&output::table(&header, &rows).unwrap_or_default());
    }
    if !s.phase_transitions.is_empty() {
        o.push_str("Phases:\n");
        let t0 = created.or_else(|| s.phase_transitions.first().map(|t| t.time.0));
        for t in &s.phase_transitions {
            let at = t0.map_or(0.0, |t0| t.time.0.duration_since(t0).as_secs_f64());
            let _ = writeln!(o, "  {at:>7.1}s  {:?}", t.phase);
        }
    }
    o.push_str("Events:");
    if events.is_empty() {
        o.push_str("  <none>\n");
    } else {
        o.push('\n');
        let rows: Vec<Vec<String>> = events
            .iter()
            .map(|e| {
                vec![
                    format!("  {}", e.type_.clone().unwrap_or_default()),
                    e.reason.clone().unwrap_or_default(),
                    event_time(e)
                        .map_or("-".into(), |t| output::age(now.duration_since(t).as_secs())),
                    e.note.clone().unwrap_or_default(),
                ]
            })
            .collect();
        o.push_str(
            &output::table(&["  TYPE", "REASON", "AGE", "MESSAGE"], &rows).unwrap_or_default(),
        );
    }
    let _ = writeln!(o, "Next:        {}", next_step(m, &key));
    o
}

/// What the operator can do about a Migration in its current state.
fn next_step(m: &Migration, key: &str) -> String {
    let s = m.status.clone().unwrap_or_default();
    let svc = format!("{}/{}", m.namespace().unwrap_or_default(), m.spec.service);
    match s.phase.unwrap_or(Phase::Pending) {
        Phase::Succeeded => format!(
            "nothing: the workload runs on {}. To move it back: `ployzctl migrate apply {svc} --to {}`",
            m.spec.to,
            s.plan.as_ref().map_or("MACHINE", |p| p.source.as_str())
        ),
        Phase::Failed | Phase::Cancelled => format!(
            "the workload runs on the source; fix what the message says, then `ployzctl migrate apply {svc} --to {}` again",
            m.spec.to
        ),
        Phase::Pending => format!(
            "wait for the target's agent to plan it (`ployzctl machine ls` shows whether {} is Ready), or `ployzctl migrate cancel {key}`",
            m.spec.to
        ),
        Phase::RollingBack => {
            "wait: the workload is being moved back to the source; if its machine is gone for good, see docs/runbook.md".into()
        }
        _ => format!(
            "wait (`ployzctl migrate watch {key}`), or `ployzctl migrate cancel {key}` to stop and move the workload back"
        ),
    }
}

/// `migrate cancel`: a Migration in flight goes back to the source and ends Cancelled (the
/// `ployz.dev/resolve: cancel` annotation, under a resourceVersion precondition); one that
/// has not started is deleted.
pub async fn cancel(
    client: Client,
    r: &ServiceRef,
    no_wait: bool,
    out: Option<OutputArg>,
) -> Result<String, CliError> {
    let api: Api<Migration> = Api::namespaced(client, &r.namespace);
    let m = existing(&api, r).await?;
    let s = m.status.clone().unwrap_or_default();
    match s.phase.unwrap_or(Phase::Pending) {
        p if p.is_terminal() => Err(CliError::Failed(anyhow::anyhow!(
            "Migration {r} already ended {p:?} ({}); there is nothing to cancel",
            s.reason.unwrap_or_default()
        ))),
        Phase::Pending => {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: m.metadata.uid.clone(),
                    resource_version: m.metadata.resource_version.clone(),
                }),
                ..DeleteParams::default()
            };
            match api.delete(&r.service, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => return Err(changed(r)),
                Err(e) => return Err(explain(e).into()),
            }
            Ok(match out {
                Some(OutputArg::Json) => {
                    format!("{}\n", json!({"migration": r.to_string(), "deleted": true}))
                }
                Some(OutputArg::Name) => output::names(KIND, [r.service.as_str()]),
                _ => format!(
                    "{KIND}/{} deleted: it had not started, nothing was moved\n",
                    r.service
                ),
            })
        }
        Phase::RollingBack => Err(CliError::Failed(anyhow::anyhow!(
            "Migration {r} is already rolling back ({}); follow it with `ployzctl migrate watch {r}`",
            s.reason.unwrap_or_default()
        ))),
        _ => {
            resolve_with(api, r, &m, "cancel", no_wait, out, |s| {
                s.phase == Some(Phase::Cancelled)
            })
            .await
        }
    }
}

fn changed(r: &ServiceRef) -> CliError {
    CliError::Failed(anyhow::anyhow!(
        "Migration {r} changed while deciding; run the command again to decide on its current state"
    ))
}

/// What the operator decides about a Migration in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Abandon,
    Complete,
}

impl Decision {
    fn value(self) -> &'static str {
        match self {
            Decision::Abandon => "abandon",
            Decision::Complete => "complete",
        }
    }
}

/// `migrate abandon|complete`: checks that the decision applies to the Migration as it is,
/// records it (the `ployz.dev/resolve` annotation, under a resourceVersion precondition), and
/// follows the Migration to its end.
pub async fn resolve(
    client: Client,
    r: &ServiceRef,
    no_wait: bool,
    decision: Decision,
    out: Option<OutputArg>,
) -> Result<String, CliError> {
    let api: Api<Migration> = Api::namespaced(client, &r.namespace);
    let m = existing(&api, r).await?;
    let s = m.status.clone().unwrap_or_default();
    let phase = s.phase.unwrap_or(Phase::Pending);
    let step = s.cutover.as_ref().map(|c| c.step);
    if phase.is_terminal() {
        return Err(CliError::Failed(anyhow::anyhow!(
            "Migration {r} already ended {phase:?} ({}); there is nothing to decide",
            s.reason.unwrap_or_default()
        )));
    }
    if phase == Phase::Pending {
        return Err(CliError::Failed(anyhow::anyhow!(
            "Migration {r} has not started; cancel it instead (`ployzctl migrate cancel {r}`)"
        )));
    }
    match decision {
        Decision::Complete
            if phase != Phase::CuttingOver || step.is_none_or(|x| x < CutoverStep::FinalSent) =>
        {
            Err(CliError::Failed(anyhow::anyhow!(
                "Migration {r} is {phase:?} (cutover step {step:?}): the target does not hold the final delta, so there is nothing complete to finish with; wait, or `ployzctl migrate abandon {r}`"
            )))
        }
        Decision::Abandon => {
            if step.is_some_and(|x| x >= CutoverStep::Pinned) && out.is_none() {
                eprintln!(
                    "note: the workload may have started on the target: what it wrote there stays in the target's copy (a read-only replica afterwards) and is not carried back."
                );
            }
            // Abandoning succeeds when the Migration ends with the workload on the source.
            resolve_with(api, r, &m, decision.value(), no_wait, out, |s| {
                s.reason.as_deref() == Some(ployz::api::Reason::Abandoned.as_str())
            })
            .await
        }
        Decision::Complete => {
            resolve_with(api, r, &m, decision.value(), no_wait, out, |s| {
                s.phase == Some(Phase::Succeeded)
            })
            .await
        }
    }
}

/// Records `decision` on `m` (the resolve annotation, only if `m` did not change since it was
/// read) and follows the Migration until it ends, `success` judging the outcome.
async fn resolve_with(
    api: Api<Migration>,
    r: &ServiceRef,
    m: &Migration,
    decision: &str,
    no_wait: bool,
    out: Option<OutputArg>,
    success: impl Fn(&MigrationStatus) -> bool,
) -> Result<String, CliError> {
    let patch = json!({"metadata": {
        "resourceVersion": m.resource_version(),
        "annotations": {RESOLVE_ANNOTATION: decision},
    }});
    match api
        .patch(&r.service, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => return Err(changed(r)),
        Err(e) => return Err(explain(e).into()),
    }
    if no_wait {
        return Ok(match out {
            Some(OutputArg::Json) => format!(
                "{}\n",
                json!({"migration": r.to_string(), "decision": decision})
            ),
            Some(OutputArg::Name) => output::names(KIND, [r.service.as_str()]),
            _ => format!(
                "{KIND}/{}: {decision} recorded; follow it with `ployzctl migrate watch {r}`\n",
                r.service
            ),
        });
    }
    follow_until(api, &r.service, out, success).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(status: serde_json::Value) -> Migration {
        serde_json::from_value(json!({
            "apiVersion": "ployz.dev/v1alpha1", "kind": "Migration",
            "metadata": {"name": "web-to-b-x1", "namespace": "demo", "uid": "u1",
                         "creationTimestamp": "2026-12-04T10:00:00Z"},
            "spec": {"service": "web", "to": "machine-b"},
            "status": status,
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn describe_shows_plan_passes_events_and_the_way_back() {
        let m = migration(json!({
            "phase": "Succeeded", "reason": "Completed", "message": "runs on machine-b",
            "downtimeMilliseconds": 2345,
            "plan": {"source": "machine-a", "target": "machine-b",
                     "workload": {"kind": "Deployment", "name": "web"},
                     "volumes": [{"claim": "data", "volume": "pv-1",
                                  "sourceDataset": "tank/ployz/a", "targetDataset": "tank/ployz/a"}]},
            "preCopy": {"pass": 2, "snapshot": "s", "passBytes": [1048576, 2048]},
            "cutover": {"step": "ScaledUp", "originalReplicas": 1, "finalSnapshot": "f",
                        "started": "2026-12-04T10:00:05.100000Z",
                        "steps": [{"step": "Started", "at": "2026-12-04T10:00:05.100000Z"},
                                  {"step": "ScaledDown", "at": "2026-12-04T10:00:05.950000Z"}]},
            "phaseTransitions": [
                {"phase": "Pending", "time": "2026-12-04T10:00:00Z"},
                {"phase": "Succeeded", "time": "2026-12-04T10:00:09Z"}],
        }));
        let event: Event = serde_json::from_value(json!({
            "metadata": {"name": "e1", "creationTimestamp": "2026-12-04T10:00:09Z"},
            "eventTime": "2026-12-04T10:00:09.000000Z",
            "type": "Normal", "reason": "Succeeded", "note": "moved to machine-b",
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let now: Timestamp = "2026-12-04T10:05:00Z"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let text = describe_text(&m, &[event], now);
        for want in [
            "Workload:    Deployment web (service web)\n",
            "From:        machine-a\n",
            "Phase:       Succeeded (Completed)\n",
            "Downtime:    2.3s\n",
            "Sent:        1.0MiB in 2 pass(es)",
            "  data    pv-1     machine-a:tank/ployz/a   machine-b:tank/ployz/a   full\n",
            "      9.0s  Succeeded\n",
            "Cutover steps:\n     0.00s  Started\n     0.85s  ScaledDown\n     2.35s  Ready\n",
            "Succeeded   4m",
            "moved to machine-b",
            "ployzctl migrate apply demo/web --to machine-a",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
    }

    #[test]
    fn describe_of_one_in_flight_says_how_to_stop_it() {
        let m = migration(json!({"phase": "Sending"}));
        let text = describe_text(&m, &[], Timestamp::now());
        assert!(text.contains("From:        (not planned yet)"), "{text}");
        assert!(text.contains("Events:  <none>"), "{text}");
        assert!(
            text.contains("ployzctl migrate cancel demo/web-to-b-x1"),
            "{text}"
        );
    }
}
