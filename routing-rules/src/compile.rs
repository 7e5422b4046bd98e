//! Spec → validated → compiled. Every problem is collected; a file compiles whole or not at all.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use globset::{Glob, GlobSetBuilder};
use serde_saphyr::{Location, Spanned};

use crate::compiled::{
    CompiledRules, Conditions, KeyDigest, Limits, Model, Pool, Range, RetryPolicy, Rule, Tenant,
    TokenizerRef, key_digest,
};
use crate::features::ModalitySet;
use crate::problem::{Problem, RulesError};
use crate::spec::{
    Auth, Capacity, KeySpec, RangeSpec, RetrySpec, RulesSpec, TokenizerSpec, WhenSpec,
};

/// Largest rules file accepted.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// The only schema version this build understands.
pub const VERSION: u32 = 1;

/// Parses and compiles a rules document. `base_dir` resolves relative tokenizer paths.
pub fn compile(yaml: &str, base_dir: &Path) -> Result<CompiledRules, RulesError> {
    if yaml.len() as u64 > MAX_FILE_BYTES {
        return Err(RulesError::TooLarge {
            size: yaml.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    let spec = parse(yaml)?;
    let mut c = Compiler::default();
    let compiled = c.compile(spec, base_dir);
    if c.problems.is_empty() {
        Ok(compiled)
    } else {
        Err(RulesError::Invalid(c.problems))
    }
}

/// Reads and compiles a rules file.
pub fn compile_file(path: &Path) -> Result<CompiledRules, RulesError> {
    let bytes = read_bounded(path)?;
    compile_bytes(&bytes, path)
}

/// Compiles the bytes read from the rules file at `path`.
pub(crate) fn compile_bytes(bytes: &[u8], path: &Path) -> Result<CompiledRules, RulesError> {
    let text = std::str::from_utf8(bytes).map_err(|_| RulesError::Read {
        path: path.display().to_string(),
        reason: "stream did not contain valid UTF-8".into(),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    compile(text, base)
}

/// Reads at most [`MAX_FILE_BYTES`] of a rules file. The size is checked before reading and
/// the read itself stops one byte past the limit, so a file that grows meanwhile, or a
/// special file (`/dev/zero`, a FIFO) whose length says nothing, cannot exhaust memory.
pub(crate) fn read_bounded(path: &Path) -> Result<Vec<u8>, RulesError> {
    let read_err = |e: std::io::Error| RulesError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let len = file.metadata().map_err(read_err)?.len();
    if len > MAX_FILE_BYTES {
        return Err(RulesError::TooLarge {
            size: len,
            limit: MAX_FILE_BYTES,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(RulesError::TooLarge {
            size: bytes.len() as u64,
            limit: MAX_FILE_BYTES,
        });
    }
    Ok(bytes)
}

fn parse(yaml: &str) -> Result<RulesSpec, RulesError> {
    let mut options = serde_saphyr::Options::default();
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    options.alias_limits.max_total_replayed_events = 0;
    options.alias_limits.max_alias_expansions_per_anchor = 0;
    // Anchors and aliases are refused outright: a rules file has no use for them, and they
    // are how "billion laughs" files blow up parsers.
    if let Some(loc) = find_alias_or_anchor(yaml) {
        return Err(RulesError::Invalid(vec![Problem {
            path: "$".into(),
            line: Some(loc.0),
            column: Some(loc.1),
            message: "YAML anchors and aliases (&name, *name) are not allowed in rules files"
                .into(),
        }]));
    }
    serde_saphyr::from_str_with_options::<RulesSpec>(yaml, options).map_err(|e| {
        let loc = e.location();
        RulesError::Invalid(vec![Problem {
            path: "$".into(),
            line: loc.as_ref().map(Location::line),
            column: loc.as_ref().map(Location::column),
            message: first_line(&e.to_string()),
        }])
    })
}

/// The parser's first line, without its own "error: line N column M: " prefix (the
/// problem carries the location already).
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or(s);
    let line = line.strip_prefix("error: ").unwrap_or(line);
    match line
        .strip_prefix("line ")
        .and_then(|rest| rest.split_once(": "))
    {
        Some((loc, msg)) if loc.contains("column") => msg.to_string(),
        _ => line.to_string(),
    }
}

/// Finds an anchor (`&x`) or alias (`*x`) token outside quotes and comments: its line and
/// column (in characters, 1-based). One pass, linear in the text's length.
fn find_alias_or_anchor(yaml: &str) -> Option<(u64, u64)> {
    for (ln, line) in yaml.lines().enumerate() {
        let (mut single, mut double) = (false, false);
        let mut prev = ' ';
        let mut chars = line.chars().enumerate().peekable();
        while let Some((col, ch)) = chars.next() {
            match ch {
                '\'' if !double => single = !single,
                '"' if !single => double = !double,
                '#' if !single && !double && (prev == ' ' || col == 0) => break,
                '&' | '*' if !single && !double => {
                    let starts_token =
                        col == 0 || matches!(prev, ' ' | '[' | '{' | ',' | '-' | ':');
                    let next = chars.peek().map(|&(_, n)| n);
                    if starts_token && next.is_some_and(|n| n.is_alphanumeric() || n == '_') {
                        return Some((ln as u64 + 1, col as u64 + 1));
                    }
                }
                _ => {}
            }
            prev = ch;
        }
    }
    None
}

#[derive(Default)]
struct Compiler {
    problems: Vec<Problem>,
}

impl Compiler {
    fn problem(&mut self, path: impl Into<String>, loc: Option<&Location>, msg: impl Into<String>) {
        self.problems.push(Problem::at(path, loc, msg));
    }

    fn compile(&mut self, spec: RulesSpec, base_dir: &Path) -> CompiledRules {
        if spec.version != VERSION {
            self.problem(
                "version",
                None,
                format!(
                    "unsupported version {} (this build reads version {VERSION})",
                    spec.version
                ),
            );
        }
        let pools = self.pools(&spec, base_dir);
        let models = self.models(&spec, base_dir);
        let default_retry = match &spec.retry {
            Some(r) => self.retry(r, "retry", &RetryPolicy::default()),
            None => RetryPolicy::default(),
        };

        let mut rules = Vec::new();
        let mut names = BTreeSet::new();
        for (i, r) in spec.rules.iter().enumerate() {
            let path = format!("rules[{i}]");
            let loc = Some(&r.referenced);
            let r = &r.value;
            if r.name.trim().is_empty() {
                self.problem(format!("{path}.name"), loc, "rule name is empty");
            } else if r.name == "default" {
                self.problem(
                    format!("{path}.name"),
                    loc,
                    "`default` is reserved for the default route",
                );
            } else if !names.insert(r.name.clone()) {
                self.problem(
                    format!("{path}.name"),
                    loc,
                    format!("duplicate rule name `{}`", r.name),
                );
            }
            let before = self.problems.len();
            let when = match &r.when {
                Some(w) => self.conditions(w, &format!("{path}.when"), &models),
                None => Conditions::default(),
            };
            // A condition that failed validation is missing from `when`: keep the rule out
            // of the shadowing check, or it would look broader than it is.
            let when_valid = self.problems.len() == before;
            let targets = self.route(
                &r.route,
                r.fallback_on_demand,
                &format!("{path}.route"),
                &pools,
            );
            let retry = match &r.retry {
                Some(rs) => self.retry(rs, &format!("{path}.retry"), &default_retry),
                None => default_retry.clone(),
            };
            rules.push((
                loc.cloned(),
                when_valid,
                Rule {
                    name: Arc::from(r.name.as_str()),
                    when,
                    targets,
                    retry,
                    slo_ttft_p95: self.slo(r.slo.as_ref(), &path),
                },
            ));
        }

        // Unreachable rules: an earlier rule accepts everything a later one would.
        for j in 0..rules.len() {
            if !rules[j].1 {
                continue;
            }
            if let Some(i) =
                (0..j).find(|&i| rules[i].1 && rules[i].2.when.covers(&rules[j].2.when))
            {
                let msg = format!(
                    "rule `{}` can never match: rule `{}` (rules[{i}]) catches every request it would",
                    rules[j].2.name, rules[i].2.name
                );
                let loc = rules[j].0;
                self.problem(format!("rules[{j}]"), loc.as_ref(), msg);
            }
        }
        let catch_all = rules
            .iter()
            .any(|(_, valid, r)| *valid && r.when.is_catch_all());
        let default = match (&spec.default, catch_all) {
            (Some(d), true) => {
                self.problem("default", Some(&d.referenced), "the default route can never be used: a rule without `when` already catches every request");
                None
            }
            (Some(d), false) => {
                let targets = self.route(
                    &d.value.route,
                    d.value.fallback_on_demand,
                    "default.route",
                    &pools,
                );
                let retry = match &d.value.retry {
                    Some(rs) => self.retry(rs, "default.retry", &default_retry),
                    None => default_retry.clone(),
                };
                Some(Rule {
                    name: Arc::from("default"),
                    when: Conditions::default(),
                    targets,
                    retry,
                    slo_ttft_p95: self.slo(d.value.slo.as_ref(), "default"),
                })
            }
            (None, true) => None,
            (None, false) => {
                self.problem("default", None, "no default route: add `default: { route: [...] }` or end the rules with one that has no `when`");
                None
            }
        };

        let (tenants, keys) = self.tenants(&spec, base_dir);
        for (i, r) in rules.iter().enumerate() {
            for t in r.2.when.tenant.iter().flatten() {
                // `key-…` names a key's derived id; anything else must be configured
                if !t.starts_with("key-") && !tenants.iter().any(|c: &Tenant| &*c.name == t) {
                    let loc = r.0;
                    self.problem(
                        format!("rules[{i}].when.tenant"),
                        loc.as_ref(),
                        format!("unknown tenant `{t}`: declare it under `tenants`, or name a key's id (`key-…`)"),
                    );
                }
            }
        }
        let rules: Vec<Rule> = rules.into_iter().map(|(_, _, r)| r).collect();
        let mut context_cuts = BTreeSet::new();
        let mut prompt_cuts = BTreeSet::new();
        let mut header_names = BTreeSet::new();
        for r in &rules {
            let cut = |set: &mut BTreeSet<u64>, range: &Option<Range>| {
                if let Some(range) = range {
                    if range.at_least > 0 {
                        set.insert(range.at_least);
                    }
                    if range.at_most < u64::MAX {
                        set.insert(range.at_most + 1);
                    }
                }
            };
            cut(&mut context_cuts, &r.when.context_tokens);
            cut(&mut prompt_cuts, &r.when.prompt_tokens);
            if let Some(h) = &r.when.headers {
                header_names.extend(h.keys().cloned());
            }
        }
        CompiledRules {
            pools,
            models,
            rules,
            default,
            context_cuts: context_cuts.into_iter().collect(),
            prompt_cuts: prompt_cuts.into_iter().collect(),
            header_names: header_names.into_iter().collect(),
            auth: spec.auth,
            tenants,
            keys,
        }
    }

    /// The tenants and their keys' digests. Keys read from the environment or a file are
    /// hashed at once; the key itself is kept nowhere.
    fn tenants(
        &mut self,
        spec: &RulesSpec,
        base_dir: &Path,
    ) -> (Vec<Tenant>, HashMap<KeyDigest, usize>) {
        let mut tenants = Vec::new();
        let mut keys: HashMap<KeyDigest, usize> = HashMap::new();
        if spec.auth == Auth::Required && spec.tenants.is_empty() {
            self.problem(
                "auth",
                None,
                "`auth: required` with no tenants would refuse every request",
            );
        }
        for (name, t) in &spec.tenants {
            let path = format!("tenants.{name}");
            let loc = Some(&t.referenced);
            let t = &t.value;
            if !valid_name(name)
                || name.starts_with("key-")
                || name == "anonymous"
                || name == "other"
            {
                self.problem(
                    &path,
                    loc,
                    "tenant names use letters, digits, '-', '_' and '.', and are not `anonymous`, `other` or `key-…`",
                );
            }
            if t.keys.is_empty() {
                self.problem(
                    format!("{path}.keys"),
                    loc,
                    "a tenant needs at least one key",
                );
            }
            let index = tenants.len();
            for (k, key) in t.keys.iter().enumerate() {
                let kpath = format!("{path}.keys[{k}]");
                let digest = match key {
                    KeySpec::Sha256(hex) => match parse_hex_digest(hex) {
                        Some(d) => d,
                        None => {
                            self.problem(
                                &kpath,
                                loc,
                                "sha256 must be 64 hex digits (the key's SHA-256)",
                            );
                            continue;
                        }
                    },
                    KeySpec::Env(var) => match std::env::var(var) {
                        Ok(v) if !v.trim().is_empty() => key_digest(v.trim()),
                        _ => {
                            self.problem(
                                &kpath,
                                loc,
                                format!("environment variable `{var}` is not set (or empty)"),
                            );
                            continue;
                        }
                    },
                    KeySpec::File(file) => {
                        let p = base_dir.join(file);
                        match std::fs::read_to_string(&p) {
                            Ok(v) if !v.trim().is_empty() && v.len() <= 4096 => {
                                key_digest(v.trim())
                            }
                            Ok(_) => {
                                self.problem(
                                    &kpath,
                                    loc,
                                    format!(
                                        "key file {} is empty or longer than 4 KiB",
                                        p.display()
                                    ),
                                );
                                continue;
                            }
                            Err(e) => {
                                self.problem(
                                    &kpath,
                                    loc,
                                    format!("cannot read key file {}: {e}", p.display()),
                                );
                                continue;
                            }
                        }
                    }
                };
                if let Some(other) = keys.insert(digest, index)
                    && other != index
                {
                    let other_name = tenants
                        .get(other)
                        .map_or("?", |t: &Tenant| &t.name)
                        .to_string();
                    self.problem(
                        &kpath,
                        loc,
                        format!("this key is also tenant `{other_name}`'s"),
                    );
                }
            }
            let positive = |c: &mut Self, field: &str, v: Option<u32>| -> Option<NonZeroU32> {
                let v = v?;
                let n = NonZeroU32::new(v);
                if n.is_none() {
                    c.problem(
                        format!("{path}.limits.{field}"),
                        loc,
                        "must be at least 1 (leave it out for no limit)",
                    );
                }
                n
            };
            let dollars = |c: &mut Self, field: &str, usd: Option<f64>| {
                let usd = usd?;
                let nano = usd * 1e9;
                let n = (usd.is_finite() && nano >= 1.0 && nano < u64::MAX as f64)
                    .then(|| std::num::NonZeroU64::new(nano.round() as u64))
                    .flatten();
                if n.is_none() {
                    c.problem(
                        format!("{path}.limits.{field}"),
                        loc,
                        "must be a positive number of dollars (at least 0.000000001)",
                    );
                }
                n
            };
            let budget = dollars(self, "budget_usd_per_day", t.limits.budget_usd_per_day);
            let monthly = dollars(self, "budget_usd_per_month", t.limits.budget_usd_per_month);
            let breaker = t.limits.breaker.as_ref().and_then(|b| {
                let mut ok = true;
                let mut check = |c: &mut Self, field: &str, v: u32, range: (u32, u32)| {
                    if !(range.0..=range.1).contains(&v) {
                        ok = false;
                        c.problem(
                            format!("{path}.limits.breaker.{field}"),
                            loc,
                            format!("must be between {} and {}", range.0, range.1),
                        );
                    }
                };
                check(self, "error_percent", b.error_percent, (1, 100));
                check(self, "min_requests", b.min_requests, (1, u32::MAX));
                check(self, "window_s", b.window_s, (1, 3600));
                check(self, "open_s", b.open_s, (1, 3600));
                ok.then_some(crate::compiled::BreakerLimits {
                    error_percent: b.error_percent,
                    min_requests: b.min_requests,
                    window_s: b.window_s,
                    open_s: b.open_s,
                })
            });
            let limits = Limits {
                breaker,
                budget_nano_usd_per_day: budget,
                budget_nano_usd_per_month: monthly,
                requests_per_minute: positive(
                    self,
                    "requests_per_minute",
                    t.limits.requests_per_minute,
                ),
                tokens_per_minute: positive(self, "tokens_per_minute", t.limits.tokens_per_minute),
                max_concurrent: positive(self, "max_concurrent", t.limits.max_concurrent),
            };
            for (field, names, known) in [
                (
                    "models",
                    &t.models,
                    &spec.models.keys().cloned().collect::<Vec<_>>(),
                ),
                (
                    "pools",
                    &t.pools,
                    &spec.pools.keys().cloned().collect::<Vec<_>>(),
                ),
            ] {
                for (i, n) in names.iter().flatten().enumerate() {
                    if !known.contains(n) {
                        self.problem(
                            format!("{path}.{field}[{i}]"),
                            loc,
                            format!("unknown {} `{n}`", field.trim_end_matches('s')),
                        );
                    }
                }
            }
            tenants.push(Tenant {
                name: Arc::from(name.as_str()),
                limits,
                models: t.models.clone(),
                pools: t.pools.clone(),
            });
        }
        (tenants, keys)
    }

    fn pools(&mut self, spec: &RulesSpec, base_dir: &Path) -> Vec<Pool> {
        if spec.pools.is_empty() {
            self.problem("pools", None, "no pools defined");
        }
        let mut pools = Vec::new();
        for (name, p) in &spec.pools {
            let path = format!("pools.{name}");
            let loc = Some(&p.referenced);
            let p = &p.value;
            if !valid_name(name) {
                self.problem(
                    &path,
                    loc,
                    "pool names use letters, digits, '-', '_' and '.'",
                );
            }
            if p.class.trim().is_empty() {
                self.problem(format!("{path}.class"), loc, "class is empty");
            }
            if !(p.cost_per_hour.is_finite() && p.cost_per_hour >= 0.0) {
                self.problem(
                    format!("{path}.cost_per_hour"),
                    loc,
                    format!("must be a non-negative number, got {}", p.cost_per_hour),
                );
            }
            for (i, w) in p.workers.iter().enumerate() {
                if !valid_host_port(w) {
                    self.problem(
                        format!("{path}.workers[{i}]"),
                        loc,
                        format!("`{w}` is not host:port"),
                    );
                }
            }
            if !p.models.is_empty() && p.workers.is_empty() {
                self.problem(
                    format!("{path}.models"),
                    loc,
                    "`models` names what the pool's static `workers` serve, and the pool lists \
                     none (registered workers advertise their own models)",
                );
            }
            for (i, m) in p.models.iter().enumerate() {
                if m.trim().is_empty() {
                    self.problem(format!("{path}.models[{i}]"), loc, "model name is empty");
                }
            }
            let upstream = p
                .upstream
                .as_ref()
                .and_then(|u| self.upstream(u, &format!("{path}.upstream"), loc, base_dir))
                .map(Arc::new);
            pools.push(Pool {
                name: Arc::from(name.as_str()),
                class: p.class.clone(),
                capacity: p.capacity,
                cost_per_hour: p.cost_per_hour,
                labels: p.labels.clone(),
                workers: p.workers.clone(),
                models: p.models.clone(),
                select: p.select,
                upstream,
            });
        }
        pools
    }

    /// A pool's upstream settings, its files and secret read now: `None` (with problems)
    /// when anything is missing or unreadable.
    fn upstream(
        &mut self,
        u: &crate::spec::UpstreamSpec,
        path: &str,
        loc: Option<&Location>,
        base_dir: &Path,
    ) -> Option<crate::compiled::Upstream> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let before = self.problems.len();
        let read = |c: &mut Self, field: &str, file: &str| -> Option<Vec<u8>> {
            let p = base_dir.join(file);
            match std::fs::read(&p) {
                Ok(b) if b.len() <= 1 << 20 => Some(b),
                Ok(_) => {
                    c.problem(
                        format!("{path}.{field}"),
                        loc,
                        format!("{} is over 1 MiB", p.display()),
                    );
                    None
                }
                Err(e) => {
                    c.problem(
                        format!("{path}.{field}"),
                        loc,
                        format!("cannot read {}: {e}", p.display()),
                    );
                    None
                }
            }
        };
        let certs = |c: &mut Self, field: &str, pem: &[u8]| -> Vec<Vec<u8>> {
            let ders: Result<Vec<Vec<u8>>, _> = CertificateDer::pem_slice_iter(pem)
                .map(|r| r.map(|d| d.as_ref().to_vec()))
                .collect();
            match ders {
                Ok(d) if !d.is_empty() => {
                    // what the TLS stack will parse, parsed now (it would not forgive it later)
                    if d.iter()
                        .any(|der| x509_parser::parse_x509_certificate(der).is_err())
                    {
                        c.problem(
                            format!("{path}.{field}"),
                            loc,
                            "holds a certificate that is not valid X.509",
                        );
                        return Vec::new();
                    }
                    d
                }
                _ => {
                    c.problem(format!("{path}.{field}"), loc, "holds no PEM certificate");
                    Vec::new()
                }
            }
        };
        let ca_der = match &u.ca_file {
            Some(f) => {
                read(self, "ca_file", f).map_or_else(Vec::new, |pem| certs(self, "ca_file", &pem))
            }
            None => Vec::new(),
        };
        let client = match (&u.client_cert, &u.client_key) {
            (Some(cert), Some(key)) => {
                let chain = read(self, "client_cert", cert)
                    .map_or_else(Vec::new, |pem| certs(self, "client_cert", &pem));
                let key = read(self, "client_key", key).and_then(|pem| {
                    match PrivateKeyDer::from_pem_slice(&pem) {
                        // the TLS stack reads the key back from DER: it must be readable so
                        Ok(k) if PrivateKeyDer::try_from(k.secret_der().to_vec()).is_ok() => {
                            Some(k.secret_der().to_vec())
                        }
                        _ => {
                            self.problem(
                                format!("{path}.client_key"),
                                loc,
                                "holds no readable PEM private key",
                            );
                            None
                        }
                    }
                });
                key.map(|k| (chain, k))
            }
            (None, None) => None,
            _ => {
                self.problem(path, loc, "`client_cert` and `client_key` go together");
                None
            }
        };
        if !u.tls && (u.ca_file.is_some() || client.is_some() || u.server_name.is_some()) {
            self.problem(
                format!("{path}.tls"),
                loc,
                "`ca_file`, `client_cert`/`client_key` and `server_name` need `tls: true`",
            );
        }
        let authorization = match &u.api_key {
            None => None,
            Some(crate::spec::SecretSpec::Env(var)) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Some(format!("Bearer {}", v.trim())),
                _ => {
                    self.problem(
                        format!("{path}.api_key"),
                        loc,
                        format!("environment variable `{var}` is not set (or empty)"),
                    );
                    None
                }
            },
            Some(crate::spec::SecretSpec::File(file)) => {
                read(self, "api_key", file).and_then(|b| match String::from_utf8(b) {
                    Ok(v) if !v.trim().is_empty() && v.trim().len() <= 4096 => {
                        Some(format!("Bearer {}", v.trim()))
                    }
                    _ => {
                        self.problem(
                            format!("{path}.api_key"),
                            loc,
                            "the key file is empty, longer than 4 KiB or not UTF-8",
                        );
                        None
                    }
                })
            }
        };
        if authorization
            .as_deref()
            .is_some_and(|a| a.bytes().any(|b| b.is_ascii_control()))
        {
            self.problem(
                format!("{path}.api_key"),
                loc,
                "the key holds control characters",
            );
        }
        if self.problems.len() > before {
            return None;
        }
        Some(crate::compiled::Upstream {
            tls: u.tls.then(|| crate::compiled::UpstreamTls {
                ca_der,
                client,
                server_name: u.server_name.clone(),
            }),
            authorization,
        })
    }

    fn models(&mut self, spec: &RulesSpec, base_dir: &Path) -> BTreeMap<String, Model> {
        let mut models = BTreeMap::new();
        for (name, m) in &spec.models {
            let path = format!("models.{name}");
            let loc = Some(&m.referenced);
            let m = &m.value;
            if m.context_window == 0 {
                self.problem(format!("{path}.context_window"), loc, "must be > 0");
            }
            let default_max_tokens = m.default_max_tokens.unwrap_or(256);
            if default_max_tokens > m.context_window {
                self.problem(
                    format!("{path}.default_max_tokens"),
                    loc,
                    format!(
                        "{default_max_tokens} exceeds the context window {}",
                        m.context_window
                    ),
                );
            }
            let resolve = |p: &str| {
                let p = Path::new(p);
                if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    base_dir.join(p)
                }
            };
            let tokenizer = match &m.tokenizer {
                TokenizerSpec::Gguf(p) => TokenizerRef::Gguf(resolve(p)),
                TokenizerSpec::Json(p) => TokenizerRef::Json(resolve(p)),
            };
            models.insert(
                name.clone(),
                Model {
                    name: name.clone(),
                    tokenizer,
                    context_window: m.context_window,
                    default_max_tokens,
                    image_tokens: m.image_tokens.unwrap_or(765),
                    audio_tokens: m.audio_tokens.unwrap_or(750),
                },
            );
        }
        models
    }

    fn range(&mut self, r: &Spanned<RangeSpec>, path: &str) -> Option<Range> {
        let loc = Some(&r.referenced);
        match (r.value.at_least, r.value.at_most) {
            (None, None) => {
                self.problem(path, loc, "empty range: give at_least and/or at_most");
                None
            }
            (lo, hi) => {
                let range = Range {
                    at_least: lo.unwrap_or(0),
                    at_most: hi.unwrap_or(u64::MAX),
                };
                if range.at_least > range.at_most {
                    self.problem(
                        path,
                        loc,
                        format!(
                            "impossible range: at_least {} > at_most {}",
                            range.at_least, range.at_most
                        ),
                    );
                    return None;
                }
                Some(range)
            }
        }
    }

    fn conditions(
        &mut self,
        w: &WhenSpec,
        path: &str,
        models: &BTreeMap<String, Model>,
    ) -> Conditions {
        let mut c = Conditions::default();
        if let Some(r) = &w.context_tokens {
            c.context_tokens = self.range(r, &format!("{path}.context_tokens"));
        }
        if let Some(r) = &w.prompt_tokens {
            c.prompt_tokens = self.range(r, &format!("{path}.prompt_tokens"));
        }
        if let Some(m) = &w.modality {
            let p = format!("{path}.modality");
            if m.value.any_of.is_empty() && m.value.none_of.is_empty() {
                self.problem(&p, Some(&m.referenced), "give any_of and/or none_of");
            }
            let any: ModalitySet = m.value.any_of.iter().copied().collect();
            let none: ModalitySet = m.value.none_of.iter().copied().collect();
            if any.intersects(none) {
                self.problem(
                    &p,
                    Some(&m.referenced),
                    "a modality is in both any_of and none_of",
                );
            }
            c.modality_any_of = (!any.is_empty()).then_some(any);
            c.modality_none_of = (!none.is_empty()).then_some(none);
        }
        if let Some(m) = &w.model {
            let p = format!("{path}.model");
            let mut b = GlobSetBuilder::new();
            if m.value.is_empty() {
                self.problem(&p, Some(&m.referenced), "empty model list");
            }
            for (i, g) in m.value.iter().enumerate() {
                let is_glob = g.contains(['*', '?', '[']);
                if !is_glob && !models.is_empty() && !models.contains_key(g) {
                    self.problem(
                        format!("{p}[{i}]"),
                        Some(&m.referenced),
                        format!("unknown model `{g}` (not in `models`)"),
                    );
                }
                match Glob::new(g) {
                    Ok(glob) => {
                        b.add(glob);
                    }
                    Err(e) => self.problem(
                        format!("{p}[{i}]"),
                        Some(&m.referenced),
                        format!("bad glob: {e}"),
                    ),
                }
            }
            if let Ok(set) = b.build() {
                c.model = Some((m.value.clone(), set));
            }
        }
        if let Some(t) = &w.tenant {
            if t.is_empty() {
                self.problem(format!("{path}.tenant"), None, "empty tenant list");
            }
            c.tenant = Some(t.clone());
        }
        if let Some(h) = &w.headers {
            c.headers = Some(
                h.iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                    .collect(),
            );
        }
        c.stream = w.stream;
        if let Some(e) = &w.endpoint {
            if e.is_empty() {
                self.problem(format!("{path}.endpoint"), None, "empty endpoint list");
            }
            c.endpoint = Some(e.clone());
        }
        c
    }

    fn route(
        &mut self,
        route: &Spanned<Vec<String>>,
        fallback: bool,
        path: &str,
        pools: &[Pool],
    ) -> Arc<[Arc<str>]> {
        let loc = Some(&route.referenced);
        if route.value.is_empty() {
            self.problem(path, loc, "empty route: list at least one pool");
        }
        let mut out: Vec<Arc<str>> = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, name) in route.value.iter().enumerate() {
            let Some(pool) = pools.iter().find(|p| &*p.name == name) else {
                self.problem(
                    format!("{path}[{i}]"),
                    loc,
                    format!("unknown pool `{name}`"),
                );
                continue;
            };
            if !seen.insert(name.clone()) {
                self.problem(
                    format!("{path}[{i}]"),
                    loc,
                    format!("pool `{name}` is listed twice"),
                );
                continue;
            }
            out.push(pool.name.clone());
            if fallback && pool.capacity == Capacity::Spot {
                let od = pools
                    .iter()
                    .find(|p| p.class == pool.class && p.capacity == Capacity::OnDemand);
                match od {
                    Some(od) if !route.value.contains(&od.name.to_string()) => {
                        if seen.insert(od.name.to_string()) {
                            out.push(od.name.clone());
                        }
                    }
                    Some(_) => {}
                    None => self.problem(
                        format!("{path}[{i}]"),
                        loc,
                        format!(
                            "fallback_on_demand: no on_demand pool of class `{}` for `{name}`",
                            pool.class
                        ),
                    ),
                }
            }
        }
        Arc::from(out)
    }

    /// A rule's latency objective, its value checked.
    fn slo(&mut self, s: Option<&crate::spec::SloSpec>, path: &str) -> Option<Duration> {
        let ms = s?.ttft_p95_ms;
        if !(1..=600_000).contains(&ms) {
            self.problem(
                format!("{path}.slo.ttft_p95_ms"),
                None,
                format!("must be 1..=600000, got {ms}"),
            );
            return None;
        }
        Some(Duration::from_millis(ms))
    }

    /// The policy `r` gives over `base` (every key it leaves out is inherited). Invalid
    /// values are reported and `base` is kept, so routes inheriting from it do not report
    /// them again.
    fn retry(&mut self, r: &Spanned<RetrySpec>, path: &str, base: &RetryPolicy) -> RetryPolicy {
        let loc = Some(&r.referenced);
        let r = &r.value;
        let policy = RetryPolicy::try_new(
            r.max_attempts.unwrap_or(base.max_attempts),
            r.budget_ratio.unwrap_or(base.budget_ratio),
            r.budget_floor.unwrap_or(base.budget_floor),
            r.on.clone().unwrap_or_else(|| base.on.clone()),
            r.backoff_ms.map_or(base.backoff, Duration::from_millis),
        );
        match policy {
            Ok(mut p) => {
                p.resume = r.resume.unwrap_or(base.resume);
                p.escalate_after = match r.escalate_after_ms {
                    None => base.escalate_after,
                    Some(ms @ 1..=60_000) => Some(Duration::from_millis(ms)),
                    Some(ms) => {
                        self.problem(
                            format!("{path}.escalate_after_ms"),
                            loc,
                            format!("must be 1..=60000, got {ms}"),
                        );
                        base.escalate_after
                    }
                };
                p
            }
            Err(e) => {
                for v in &e.problems {
                    self.problem(format!("{path}.{}", v.field), loc, v.message());
                }
                base.clone()
            }
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

/// A SHA-256 digest written as 64 hex digits.
fn parse_hex_digest(hex: &str) -> Option<KeyDigest> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}
