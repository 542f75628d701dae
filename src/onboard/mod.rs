//! Onboarding: the commands that connect a Jebbit account and a JotUrl CTA to a named
//! intake source, hand the source's secret over without showing it, and prove the path
//! works (`segment-bridge jebbit …`, `segment-bridge joturl token`).
//!
//! - [`jebbit`]: Jebbit's Integrations API (pure requests and answers; one I/O client).
//! - [`joturl`]: a JotUrl source's URL token and webhook URL.
//! - [`secret_out`]: the 0600 file and the Kubernetes Secret manifest.
//!
//! This module owns the commands' flow and what they tell the operator: results on
//! standard output (a manifest, when asked for, alone there; the JotUrl URL alone there),
//! explanations and next steps on standard error when standard output carries data. It never prints a client secret, a token or a `shared_secret`; the
//! JotUrl webhook URL is the one exception, because the operator must paste it.

pub mod jebbit;
pub mod joturl;
pub mod secret_out;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};

use crate::config::{Config, Source, SourceKind};
use jebbit::{ApiError, Client, Credentials, Integration, Settings, Spec};

/// Why an onboarding command failed, in one line.
#[derive(Debug, thiserror::Error)]
pub enum OnboardError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot write to the terminal: {0}")]
    Output(#[from] std::io::Error),
    #[error("cannot write the secret to {path}: {error}")]
    SecretFile { path: String, error: std::io::Error },
    #[error("the test submission was not verified (see above).")]
    NotVerified,
    #[error("cannot make an HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

impl OnboardError {
    /// The process's exit code ([`crate::app::exit`]): what the operator gave is wrong
    /// (credentials missing, an undeclared source, a bad URL, an unwritable secret file):
    /// 2; anything else: 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            OnboardError::Usage(_) | OnboardError::SecretFile { .. } => crate::app::exit::USAGE,
            _ => crate::app::exit::FAILED,
        }
    }
}

fn usage(message: impl Into<String>) -> OnboardError {
    OnboardError::Usage(message.into())
}

/// Where a command's results and its explanations go.
pub struct Io<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
}

/// Where a new secret goes: a file (the default) and/or a Kubernetes Secret manifest.
#[derive(Debug, Clone, Default)]
pub struct Handover {
    /// Default when no manifest is asked for: `<source>.secret` in the working directory.
    pub secret_file: Option<PathBuf>,
    /// The name of a Kubernetes Secret to print on standard output.
    pub k8s_secret: Option<String>,
}

/// The Jebbit API settings: `[jebbit]` from the configuration, overridden by
/// `JEBBIT_API_URL`, `JEBBIT_AUTH_URL`, `JEBBIT_BUSINESS_ID`; the credentials from
/// `JEBBIT_TOKEN`, else `JEBBIT_CLIENT_ID` and `JEBBIT_CLIENT_SECRET`. `env` reads one
/// variable (the process environment in the binary).
pub fn settings(
    config: &Config,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Settings, OnboardError> {
    let var = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let url = |name: &str, key: &str, configured: &str| {
        let value = var(name).unwrap_or_else(|| configured.to_owned());
        value
            .parse::<reqwest::Url>()
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| usage(format!("{name} / `jebbit.{key}` is not an http(s) URL.")))
    };
    // Refused rather than trimmed, like every other secret: a stray newline is a sign
    // of a value copied wrongly, and the user should know.
    let secret = |name: &'static str| -> Result<Option<SecretString>, OnboardError> {
        let Some(value) = var(name) else {
            return Ok(None);
        };
        let value = SecretString::from(value);
        crate::config::check_secret(|| name.to_owned(), &value)
            .map_err(|e| usage(e.to_string()))?;
        Ok(Some(value))
    };
    let credentials = match (
        secret("JEBBIT_TOKEN")?,
        secret("JEBBIT_CLIENT_ID")?,
        secret("JEBBIT_CLIENT_SECRET")?,
    ) {
        (Some(token), _, _) => Credentials::Token(token),
        (None, Some(id), Some(secret)) => Credentials::Client {
            id: id.expose_secret().to_owned(),
            secret,
        },
        _ => {
            return Err(usage(
                "no Jebbit credentials: set JEBBIT_CLIENT_ID and JEBBIT_CLIENT_SECRET (from Jebbit's customer success team), or JEBBIT_TOKEN.",
            ));
        }
    };
    Ok(Settings {
        api_url: url("JEBBIT_API_URL", "api_url", &config.jebbit.api_url)?,
        auth_url: url("JEBBIT_AUTH_URL", "auth_url", &config.jebbit.auth_url)?,
        business_id: var("JEBBIT_BUSINESS_ID")
            .or_else(|| Some(config.jebbit.business_id.clone()))
            .filter(|b| !b.trim().is_empty()),
        credentials,
        attempts: 4,
        retry: crate::backoff::RetryPolicy {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(4),
        },
        timeout: Duration::from_secs(30),
    })
}

/// The intake source `name` of `kind`, or a message that says how to declare it.
fn source<'c>(
    config: &'c Config,
    name: &str,
    kind: SourceKind,
) -> Result<&'c Source, OnboardError> {
    match config.intake.sources.get(name) {
        Some(s) if s.kind == kind => Ok(s),
        Some(s) => Err(usage(format!(
            "intake source `{name}` is a {} source, not a {} one.",
            s.kind.as_str(),
            kind.as_str()
        ))),
        None => Err(usage(format!(
            "no intake source `{name}` in the configuration: add an [intake.sources.{name}] table with kind = \"{}\" first.",
            kind.as_str()
        ))),
    }
}

/// The public URL, checked: http(s), no query; without a trailing slash.
fn public_url(raw: &str) -> Result<String, OnboardError> {
    let url: reqwest::Url = raw
        .parse()
        .map_err(|_| usage(format!("--public-url {raw} is not a URL.")))?;
    if !matches!(url.scheme(), "http" | "https") || url.query().is_some() {
        return Err(usage(format!(
            "--public-url must be the intake's public http(s) base URL, e.g. https://intake.example.com (got {raw})."
        )));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

impl Handover {
    /// The file the secret goes to: the one named, else the default unless only a
    /// manifest is asked for.
    fn file(&self, source: &str) -> Option<PathBuf> {
        match (&self.secret_file, &self.k8s_secret) {
            (Some(path), _) => Some(path.clone()),
            (None, None) => Some(secret_out::default_file(source)),
            (None, Some(_)) => None,
        }
    }

    /// Fails before anything is created when the file cannot be written.
    fn check(&self, source: &str) -> Result<(), OnboardError> {
        match self.file(source) {
            Some(path) => {
                secret_out::check_writable(&path).map_err(|error| OnboardError::SecretFile {
                    path: path.display().to_string(),
                    error,
                })
            }
            None => Ok(()),
        }
    }
}

/// Writes `secret` where `handover` says; returns one line that says where (no secret).
fn hand_over(
    source: &str,
    secret: &SecretString,
    handover: &Handover,
    io: &mut Io<'_>,
) -> Result<String, OnboardError> {
    let mut said = Vec::new();
    let file = handover.file(source);
    if let Some(path) = &file {
        secret_out::write_file(path, secret).map_err(|error| OnboardError::SecretFile {
            path: path.display().to_string(),
            error,
        })?;
        said.push(format!("in {} (mode 0600)", path.display()));
    }
    if let Some(name) = &handover.k8s_secret {
        io.out
            .write_all(secret_out::k8s_manifest(name, source, secret).as_bytes())?;
        said.push(format!(
            "in the Kubernetes Secret `{name}` printed on standard output"
        ));
    }
    let var = secret_out::env_var(source);
    let next = match (&file, &handover.k8s_secret) {
        (_, Some(name)) => format!(
            "apply it (kubectl apply -f), reference it from the intake's Deployment (envFrom: secretRef: {name}), then roll the intake (kubectl rollout restart deployment/<intake>)"
        ),
        (Some(path), None) => format!(
            "give it to the intake as {var} (e.g. {var}=\"$(cat {})\", or kubectl create secret generic <name> --from-file={var}={}), then restart or roll the intake",
            path.display(),
            path.display()
        ),
        (None, None) => unreachable!("a file is the default"),
    };
    Ok(format!(
        "The secret is {}; it was not shown. Next: {next}.",
        said.join(" and ")
    ))
}

// ---- Jebbit ----------------------------------------------------------------------------

/// `jebbit whoami`: the business of the credentials.
pub async fn whoami(client: &Client, io: &mut Io<'_>) -> Result<(), OnboardError> {
    let b = client.business().await?;
    writeln!(io.out, "business {} ({})", b.id, b.name)?;
    Ok(())
}

/// `jebbit list`: the business's integrations, never their secrets.
pub async fn list(client: &Client, io: &mut Io<'_>) -> Result<(), OnboardError> {
    let integrations = client.integrations().await?;
    if integrations.is_empty() {
        writeln!(io.err, "The business has no integration yet.")?;
    }
    for i in integrations {
        writeln!(io.out, "{i}")?;
    }
    Ok(())
}

/// What `jebbit connect` needs.
#[derive(Debug, Clone)]
pub struct Connect {
    pub source: String,
    pub public_url: String,
    /// Overrides the source's region (passed to Jebbit as given).
    pub region: Option<String>,
    pub handover: Handover,
}

/// `jebbit connect`: creates (or updates) the source's `webhooks_standard` integration and
/// hands its `shared_secret` over.
pub async fn connect(
    config: &Config,
    client: &Client,
    args: &Connect,
    io: &mut Io<'_>,
) -> Result<(), OnboardError> {
    let src = source(config, &args.source, SourceKind::Jebbit)?;
    let endpoint = format!("{}/webhooks/{}", public_url(&args.public_url)?, args.source);
    let region = args.region.clone().unwrap_or_else(|| {
        src.region
            .unwrap_or(config.segment.default_region)
            .as_str()
            .to_owned()
    });
    let spec = Spec {
        endpoint: endpoint.clone(),
        region: region.clone(),
        hash_pii: config.mapping.hash_pii,
        require_opt_in: config.mapping.require_opt_in,
        include_mapped_attributes: config.mapping.include_mapped_attributes,
    };
    args.handover.check(&args.source)?;
    let existing = client
        .integrations()
        .await?
        .into_iter()
        .find(|i| i.endpoint.trim_end_matches('/') == endpoint);
    let (integration, secret) = client
        .save(&spec, existing.as_ref().map(|i| &*i.id))
        .await?;
    let verb = if existing.is_some() {
        "updated"
    } else {
        "created"
    };
    // With a manifest on standard output, everything else goes to standard error.
    let mut report = Vec::new();
    writeln!(
        report,
        "Jebbit integration {} {verb} for intake source `{}`: region {}, endpoint {}, hash_pii={}, require_opt_in={}, include_mapped_attributes={}.",
        integration.id,
        args.source,
        integration.region,
        integration.endpoint,
        spec.hash_pii,
        spec.require_opt_in,
        spec.include_mapped_attributes
    )?;
    if endpoint.starts_with("http://") {
        writeln!(
            report,
            "Note: the endpoint is plain http; Jebbit's webhooks should reach the intake over https."
        )?;
    }
    match secret {
        Some(secret) => {
            let line = hand_over(&args.source, &secret, &args.handover, io).map_err(|e| {
                usage(format!(
                    "Jebbit integration {} was {verb}, but its secret could not be handed over ({e}); delete it (segment-bridge jebbit delete --id {}) and connect again.",
                    integration.id, integration.id
                ))
            })?;
            writeln!(report, "{line}")?;
            writeln!(
                report,
                "Then prove the path: segment-bridge jebbit test --source {}",
                args.source
            )?;
        }
        None => writeln!(
            report,
            "Jebbit returned no shared secret for the existing integration: the intake keeps the one it has. For a new one: segment-bridge jebbit delete --id {}, then connect again.",
            integration.id
        )?,
    }
    let notes: &mut dyn Write = if args.handover.k8s_secret.is_some() {
        &mut *io.err
    } else {
        &mut *io.out
    };
    notes.write_all(&report)?;
    Ok(())
}

/// The integration of `source` (its endpoint ends in `/webhooks/<source>`), or the one
/// named by `id`.
pub async fn find(
    client: &Client,
    source: Option<&str>,
    id: Option<&str>,
) -> Result<Integration, OnboardError> {
    let integrations = client.integrations().await?;
    if let Some(id) = id {
        return integrations
            .into_iter()
            .find(|i| i.id == id)
            .ok_or_else(|| {
                usage(format!(
                    "Jebbit has no integration {id}: see `segment-bridge jebbit list`."
                ))
            });
    }
    let Some(source) = source else {
        return Err(usage("name the integration: --source NAME or --id ID."));
    };
    let suffix = format!("/webhooks/{source}");
    let mut matching: Vec<Integration> = integrations
        .into_iter()
        .filter(|i| i.endpoint.trim_end_matches('/').ends_with(&suffix))
        .collect();
    match matching.len() {
        0 => Err(usage(format!(
            "no Jebbit integration points at an endpoint ending in {suffix}: run `segment-bridge jebbit connect --source {source} --public-url …` first."
        ))),
        1 => Ok(matching.remove(0)),
        _ => Err(usage(format!(
            "several Jebbit integrations point at {suffix} ({}): choose one with --id.",
            matching
                .iter()
                .map(|i| i.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// What `jebbit test` needs.
#[derive(Debug, Clone)]
pub struct Test {
    pub source: String,
    pub id: Option<String>,
    /// The intake's `/metrics`.
    pub metrics_url: String,
    /// How long to wait for the intake to count the test submission.
    pub within: Duration,
}

/// The intake's counters for one source that tell how a test submission ended.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub verified: f64,
    pub unauthorized: f64,
}

/// Reads the source's counters out of the intake's `/metrics` text. A test submission
/// counts as `test`, or as `queued` when the source forwards tests.
pub fn counts(metrics: &str, source: &str, forward_tests: bool) -> Counts {
    let mut c = Counts::default();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some(labels) = series
            .strip_prefix(crate::intake::metrics::REQUESTS)
            .and_then(|l| l.strip_prefix('{'))
            .and_then(|l| l.strip_suffix('}'))
        else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == name).then(|| v.trim().trim_matches('"'))
            })
        };
        if label("source") != Some(source) {
            continue;
        }
        let value: f64 = value.trim().parse().unwrap_or(0.0);
        match label("outcome") {
            Some("test") => c.verified += value,
            Some("queued") if forward_tests => c.verified += value,
            Some("unauthorized") => c.unauthorized += value,
            _ => {}
        }
    }
    c
}

/// How a test submission ended, as far as the intake's counters tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Verified,
    NotVerified,
    NeverArrived,
}

/// The verdict once the counters moved from `before` to `now`; `None` while nothing moved.
pub fn verdict(before: Counts, now: Counts) -> Option<Verdict> {
    if now.verified > before.verified {
        Some(Verdict::Verified)
    } else if now.unauthorized > before.unauthorized {
        Some(Verdict::NotVerified)
    } else {
        None
    }
}

async fn read_counts(
    http: &reqwest::Client,
    url: &str,
    source: &str,
    forward_tests: bool,
) -> Option<Counts> {
    let response = http.get(url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let text = response.text().await.ok()?;
    Some(counts(&text, source, forward_tests))
}

/// `jebbit test`: triggers Jebbit's test submission and watches the intake's counters.
pub async fn test(
    config: &Config,
    client: &Client,
    args: &Test,
    io: &mut Io<'_>,
) -> Result<(), OnboardError> {
    let src = source(config, &args.source, SourceKind::Jebbit)?;
    let integration = find(client, Some(&args.source), args.id.as_deref()).await?;
    let http = crate::segment::http_client(Duration::from_secs(5))?;
    let read = || read_counts(&http, &args.metrics_url, &args.source, src.forward_tests);
    let before = read().await;
    if before.is_none() {
        writeln!(
            io.err,
            "The intake's metrics at {} do not answer; sending the test submission anyway.",
            args.metrics_url
        )?;
    }
    client.test(&integration.id).await?;
    writeln!(
        io.err,
        "Jebbit accepted the test submission for integration {} ({}); waiting up to {}s for the intake to count it.",
        integration.id,
        integration.endpoint,
        args.within.as_secs()
    )?;
    let start = Instant::now();
    let mut outcome = Verdict::NeverArrived;
    let mut reachable = before.is_some();
    if let Some(before) = before {
        while start.elapsed() < args.within {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let Some(now) = read().await else {
                reachable = false;
                continue;
            };
            reachable = true;
            if let Some(v) = verdict(before, now) {
                outcome = v;
                break;
            }
        }
    }
    let var = secret_out::env_var(&args.source);
    let line = match outcome {
        Verdict::Verified => format!(
            "verified: the intake received Jebbit's test submission for source `{}` and its signature verified.",
            args.source
        ),
        Verdict::NotVerified => format!(
            "arrived but the signature did not verify: the intake's secret for `{}` is not this integration's shared secret (set {var} from the file `jebbit connect` wrote and roll the intake), or the intake's clock is off by more than intake.signature_tolerance_s.",
            args.source
        ),
        Verdict::NeverArrived if !reachable => format!(
            "never arrived: the intake's metrics at {} do not answer, so the intake is likely not running (or its side port is not reachable from here: use --metrics-url, e.g. through kubectl port-forward).",
            args.metrics_url
        ),
        Verdict::NeverArrived => format!(
            "never arrived: nothing reached source `{}` within {}s; Jebbit could not reach {} (the intake is not running there, DNS, TLS or the ingress is wrong, or that public URL leads to another intake).",
            args.source,
            args.within.as_secs(),
            integration.endpoint
        ),
    };
    writeln!(io.out, "{line}")?;
    if outcome == Verdict::Verified {
        Ok(())
    } else {
        Err(OnboardError::NotVerified)
    }
}

/// What `jebbit deactivate`, `activate`, `delete` and `backfill` do to the integration
/// they name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `jebbit activate` (true) / `jebbit deactivate` (false).
    SetActive(bool),
    /// `jebbit delete`.
    Delete,
    /// `jebbit backfill`: asks Jebbit to re-send the integration's past sessions.
    Backfill,
}

/// Finds the integration posting to `source`, or the one with `id`, and does `action` to
/// it.
pub async fn act(
    client: &Client,
    source: Option<&str>,
    id: Option<&str>,
    action: Action,
    io: &mut Io<'_>,
) -> Result<(), OnboardError> {
    let integration = find(client, source, id).await?;
    match action {
        Action::SetActive(active) => {
            let changed = client.set_active(&integration.id, active).await?;
            writeln!(io.out, "{changed}")?;
        }
        Action::Delete => {
            client.delete(&integration.id).await?;
            writeln!(
                io.out,
                "Deleted Jebbit integration {} ({}).",
                integration.id, integration.endpoint
            )?;
        }
        Action::Backfill => {
            let b = client.backfill(&integration.id).await?;
            writeln!(
                io.out,
                "backfill {} of integration {}: {}",
                b.id, integration.id, b.status
            )?;
            writeln!(
                io.err,
                "Jebbit re-sends past sessions to {}; the worker delivers them (duplicates keep their messageIds). Status: segment-bridge jebbit backfill-status --id {}",
                integration.endpoint, b.id
            )?;
        }
    }
    Ok(())
}

/// `jebbit backfill-status`.
pub async fn backfill_status(
    client: &Client,
    id: &str,
    io: &mut Io<'_>,
) -> Result<(), OnboardError> {
    let b = client.backfill_status(id).await?;
    writeln!(
        io.out,
        "backfill {} of integration {}: {}",
        b.id, b.integration_id, b.status
    )?;
    Ok(())
}

// ---- JotUrl ----------------------------------------------------------------------------

/// `joturl token`: a new token for a JotUrl source, handed over like a Jebbit secret; the
/// webhook URL (which holds it) printed for JotUrl's "Set webhook" dialog.
pub fn joturl_token(
    config: &Config,
    name: &str,
    public: &str,
    handover: &Handover,
    io: &mut Io<'_>,
) -> Result<(), OnboardError> {
    source(config, name, SourceKind::Joturl)?;
    let base = public_url(public)?;
    handover.check(name)?;
    let token = joturl::new_token()
        .map_err(|e| usage(format!("no random bytes from the operating system: {e}")))?;
    let line = hand_over(name, &token, handover, io)?;
    writeln!(io.err, "A new URL token for JotUrl source `{name}`. {line}")?;
    writeln!(
        io.err,
        "Paste the URL below into the CTA's \"Set webhook\" dialog in JotUrl. It holds the token, which is the source's secret: it is shown only because it must be pasted there; keep it out of tickets and chats."
    )?;
    // The URL alone on standard output (`URL=$(…)` keeps it off the screen), unless a
    // manifest is there.
    let url: &mut dyn Write = if handover.k8s_secret.is_some() {
        &mut *io.err
    } else {
        &mut *io.out
    };
    writeln!(
        url,
        "{}",
        joturl::webhook_url(&base, name, &token).expose_secret()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"# HELP segment_bridge_intake_requests_total Webhook requests answered
segment_bridge_intake_requests_total{source="jebbit_eu",outcome="test"} 2
segment_bridge_intake_requests_total{source="jebbit_eu",outcome="unauthorized"} 1
segment_bridge_intake_requests_total{source="jebbit_eu",outcome="queued"} 7
segment_bridge_intake_requests_total{source="jebbit_eu2",outcome="test"} 5
"#;

    #[test]
    fn credentials_with_white_space_or_control_characters_are_refused_naming_the_variable() {
        let config = Config::default();
        for (name, value) in [
            ("JEBBIT_CLIENT_SECRET", "cs-7f3a\n"),
            ("JEBBIT_TOKEN", " tok-91c2"),
            ("JEBBIT_CLIENT_ID", "id-\u{7}"),
        ] {
            let env = |k: &str| match k {
                "JEBBIT_CLIENT_ID" if name != "JEBBIT_CLIENT_ID" => Some("id-1".to_owned()),
                "JEBBIT_CLIENT_SECRET" if name != "JEBBIT_CLIENT_SECRET" => Some("cs-1".to_owned()),
                k if k == name => Some(value.to_owned()),
                _ => None,
            };
            let Err(e) = settings(&config, env) else {
                panic!("{name} with {value:?} was accepted");
            };
            let message = e.to_string();
            assert!(message.contains(name), "{message}");
            assert!(
                !message.contains(value.trim()),
                "never the value: {message}"
            );
        }
        let env = |k: &str| match k {
            "JEBBIT_CLIENT_ID" => Some("id-1".to_owned()),
            "JEBBIT_CLIENT_SECRET" => Some("cs-1".to_owned()),
            _ => None,
        };
        assert!(settings(&config, env).is_ok());
    }

    #[test]
    fn counters_are_read_for_the_source_alone() {
        assert_eq!(
            counts(METRICS, "jebbit_eu", false),
            Counts {
                verified: 2.0,
                unauthorized: 1.0
            }
        );
        assert_eq!(counts(METRICS, "jebbit_eu", true).verified, 9.0);
        assert_eq!(counts(METRICS, "other", false), Counts::default());
    }

    #[test]
    fn the_verdict_follows_whichever_counter_moved() {
        let c = |verified, unauthorized| Counts {
            verified,
            unauthorized,
        };
        assert_eq!(verdict(c(1.0, 1.0), c(1.0, 1.0)), None);
        assert_eq!(verdict(c(1.0, 1.0), c(2.0, 1.0)), Some(Verdict::Verified));
        assert_eq!(
            verdict(c(1.0, 1.0), c(1.0, 2.0)),
            Some(Verdict::NotVerified)
        );
    }

    #[test]
    fn credentials_come_from_the_environment_and_a_token_wins() {
        let config = Config::default();
        let none = settings(&config, |_| None).unwrap_err().to_string();
        assert!(none.contains("JEBBIT_CLIENT_ID"), "{none}");
        let s = settings(&config, |k| match k {
            "JEBBIT_CLIENT_ID" => Some("id".into()),
            "JEBBIT_CLIENT_SECRET" => Some("secret".into()),
            "JEBBIT_BUSINESS_ID" => Some("bTUIhsye".into()),
            "JEBBIT_API_URL" => Some("https://api.jebbx.com".into()),
            _ => None,
        })
        .unwrap();
        assert!(matches!(s.credentials, Credentials::Client { .. }));
        assert_eq!(s.business_id.as_deref(), Some("bTUIhsye"));
        assert_eq!(s.api_url.as_str(), "https://api.jebbx.com/");
        assert_eq!(s.auth_url.as_str(), "https://auth.jebbit.com/");
        let t = settings(&config, |k| (k == "JEBBIT_TOKEN").then(|| "jwt".into())).unwrap();
        assert!(matches!(t.credentials, Credentials::Token(_)));
        assert_eq!(t.business_id, None);
    }
}
