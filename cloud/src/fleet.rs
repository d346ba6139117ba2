//! The fleet: gateways, tokens, pipeline versions and deployments, and the live sessions of
//! connected gateways.
//!
//! All state lives in memory behind one lock and is written through to the [`Store`] before
//! a change is visible: every change and its audit entry go into one atomic batch. A
//! gateway's desired state is computed from the deployments whose selectors match its
//! labels; whenever that set changes (a deploy, a rollback, a relabel, a reconnect) the new
//! full set is handed to the gateway's session, which sends only the latest one.
//!
//! The lock is a `std` mutex held for in-memory work only, never across an `.await`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use weir_planner::state_loss;
use weir_proto::cloud::{
    DesiredManifest, DesiredState, EnrollResponse, PlanEnvelope, PlanResult, RunningPipeline,
    SignedPlan, StatusReport, Welcome,
};
use weir_proto::plan::PipelinePlan;

use crate::error::{CloudError, Result};
use crate::model::{
    ApiToken, AuditEntry, DeploymentRecord, Enrollment, GatewayRecord, PipelineVersion, Role,
    Rollout, new_secret, now_ms, secret_hash,
};
use crate::selector::{Labels, Selector};
use crate::signing::PlanSigner;
use crate::store::{Store, Table, Write};

/// How long a one-time enrollment token stays valid.
pub const ENROLLMENT_TOKEN_LIFETIME_MS: u64 = 24 * 3600 * 1000;

/// Who is calling the API, as their token says.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// Fails unless the caller's role is at least `needed`.
    pub fn require(&self, needed: Role, what: &str) -> Result<()> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(CloudError::Forbidden(format!(
                "{what} needs the {needed} role; token '{}' has the {} role",
                self.name, self.role
            )))
        }
    }

    fn actor(&self) -> String {
        format!("token:{}", self.name)
    }
}

/// A deploy request: the SQL file, where it goes and how it ranks.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    /// The deployment's name; defaults to the first pipeline's name.
    pub name: Option<String>,
    pub sql: String,
    /// The file name, for error messages.
    pub file: String,
    pub selector: String,
    pub priority: i32,
    /// Stage the rollout: this many matching gateways first (0: everyone at once).
    pub canary: u32,
    /// How long every canary must run the new versions healthily before the rest follow.
    pub bake: Duration,
    /// More errors than this on a canary's pipeline fails the rollout.
    pub max_errors: u64,
    /// Deploy even where a new version cannot take over the state of the one it replaces:
    /// those pipelines start with empty windows. Without it, such a deploy is refused.
    pub fresh: bool,
}

/// What a deploy did.
#[derive(Debug, Clone, Serialize)]
pub struct DeployOutcome {
    pub deployment: String,
    /// Pipeline -> version; versions that did not change keep their number.
    pub pipelines: BTreeMap<String, u64>,
    /// Pipelines that got a new version with this deploy.
    pub changed: Vec<String>,
    /// Gateways the selector matches now.
    pub targets: Vec<String>,
    /// The gateways that get the new versions first, in a staged rollout.
    pub canaries: Vec<String>,
    /// Pipelines whose new version starts without the old one's state, and why.
    pub fresh: BTreeMap<String, String>,
}

/// A connected gateway's stream, as the fleet sees it.
struct Session {
    connection: u64,
    desired: watch::Sender<Option<DesiredState>>,
    /// Pipeline -> version last sent.
    sent: BTreeMap<String, u64>,
    revision: u64,
    connected_at_ms: u64,
    report: Option<StatusReport>,
    /// Pipeline -> version the gateway runs, from its Hello and then its reports.
    running: BTreeMap<String, u64>,
    reported_at: Instant,
    /// A report at least a second older than `report`, to turn counters into rates.
    earlier: Option<(Instant, StatusReport)>,
    /// Pipeline -> the gateway's answer to the version last sent.
    results: BTreeMap<String, PlanResult>,
}

#[derive(Default)]
struct State {
    gateways: BTreeMap<String, GatewayRecord>,
    credentials: HashMap<String, String>,
    enrollments: HashMap<String, Enrollment>,
    tokens: HashMap<String, ApiToken>,
    versions: BTreeMap<(String, u64), PipelineVersion>,
    deployments: BTreeMap<String, DeploymentRecord>,
    selectors: HashMap<String, Selector>,
    sessions: HashMap<String, Session>,
    last_seen_ms: HashMap<String, u64>,
    /// The last uplink streams each gateway reported, kept while it is offline: what an
    /// outage is costing shows after the stream is gone.
    uplink: HashMap<String, Vec<weir_proto::cloud::StreamStatus>>,
    audit_seq: u64,
    next_connection: u64,
}

impl State {
    fn gateway_by_name(&self, name: &str) -> Result<&GatewayRecord> {
        self.gateways
            .values()
            .find(|g| g.name == name)
            .ok_or_else(|| CloudError::NotFound(format!("no gateway named '{name}'")))
    }

    fn audit(&mut self, actor: &str, action: &str, detail: String) -> Write {
        self.audit_seq += 1;
        let entry = AuditEntry {
            seq: self.audit_seq,
            at_ms: now_ms(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            detail,
        };
        put(Table::Audit, self.audit_seq.to_be_bytes().to_vec(), &entry)
    }

    /// Pipeline -> (version, deployment) for a gateway with `labels`: the union of the
    /// matching deployments, a name claimed twice going to the higher priority, then the newer.
    /// During a staged rollout, canaries get the new versions and the others the stable ones.
    fn desired_for(&self, gateway_id: &str, labels: &Labels) -> BTreeMap<String, (u64, String)> {
        let mut chosen: BTreeMap<String, (u64, &DeploymentRecord)> = BTreeMap::new();
        for deployment in self.deployments.values() {
            let matches = self
                .selectors
                .get(&deployment.name)
                .is_some_and(|s| s.matches(labels));
            if !matches {
                continue;
            }
            let versions = match &deployment.rollout {
                Some(rollout) if !rollout.canaries.iter().any(|c| c == gateway_id) => {
                    &rollout.stable
                }
                _ => &deployment.pipelines,
            };
            for (pipeline, &version) in versions {
                let wins = chosen.get(pipeline).is_none_or(|(_, held)| {
                    (deployment.priority, deployment.updated_at_ms)
                        > (held.priority, held.updated_at_ms)
                });
                if wins {
                    chosen.insert(pipeline.clone(), (version, deployment));
                }
            }
        }
        chosen
            .into_iter()
            .map(|(pipeline, (version, d))| (pipeline, (version, d.name.clone())))
            .collect()
    }

    /// Hashes of the gateway's enrollment tokens that were never used.
    fn unused_tokens_of(&self, gateway_id: &str) -> Vec<String> {
        self.enrollments
            .iter()
            .filter(|(_, e)| e.gateway_id == gateway_id && e.used_at_ms.is_none())
            .map(|(h, _)| h.clone())
            .collect()
    }

    fn forget_enrollments(&mut self, hashes: &[String]) {
        for hash in hashes {
            self.enrollments.remove(hash);
        }
    }

    /// Per pipeline of `to`, why its plan cannot take over the state of the version of the
    /// same pipeline in `from`; pipelines that lose nothing are left out.
    fn state_losses(
        &self,
        from: &BTreeMap<String, u64>,
        to: &BTreeMap<String, u64>,
    ) -> Result<BTreeMap<String, String>> {
        let mut losses = BTreeMap::new();
        for (pipeline, version) in to {
            let plan = |version: &u64| {
                self.versions
                    .get(&(pipeline.clone(), *version))
                    .map(|record| decode_plan(&record.payload))
                    .transpose()
            };
            if let (Some(old), Some(new)) = (
                from.get(pipeline).map(plan).transpose()?.flatten(),
                plan(version)?,
            ) && let Some(reason) = state_loss(&old, &new)
            {
                losses.insert(pipeline.clone(), reason);
            }
        }
        Ok(losses)
    }

    fn max_version(&self, pipeline: &str) -> u64 {
        self.versions
            .range((pipeline.to_owned(), 0)..=(pipeline.to_owned(), u64::MAX))
            .next_back()
            .map_or(0, |((_, v), _)| *v)
    }
}

fn put<T: Serialize>(table: Table, key: Vec<u8>, value: &T) -> Write {
    // Our records always serialise: plain data with string keys.
    Write::Put(table, key, serde_json::to_vec(value).unwrap_or_default())
}

/// The writes that delete these enrollment tokens.
fn token_deletes(hashes: &[String]) -> impl Iterator<Item = Write> + '_ {
    hashes
        .iter()
        .map(|hash| Write::Delete(Table::Enrollments, hash.clone().into_bytes()))
}

fn version_key(pipeline: &str, version: u64) -> Vec<u8> {
    format!("{pipeline}/{version:020}").into_bytes()
}

/// Gateway names and deployment names: what a person types in the CLI.
fn validate_name(kind: &str, name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(CloudError::Invalid(format!(
            "{kind} name '{name}' must be 1-63 characters of A-Z, a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )))
    }
}

/// The whole fleet; see the module docs.
pub struct Fleet {
    store: Arc<dyn Store>,
    signer: PlanSigner,
    state: Mutex<State>,
    heartbeat_interval: Duration,
    revisions: AtomicU64,
}

impl Fleet {
    /// Loads every record from `store`.
    pub fn load(
        store: Arc<dyn Store>,
        signer: PlanSigner,
        heartbeat_interval: Duration,
    ) -> Result<Self> {
        let mut state = State::default();
        fn decode<T: serde::de::DeserializeOwned>(table: Table, value: &[u8]) -> Result<T> {
            serde_json::from_slice(value).map_err(|error| {
                CloudError::Storage(format!("a {table:?} record cannot be read: {error}"))
            })
        }
        fn text(key: Vec<u8>) -> String {
            String::from_utf8_lossy(&key).into_owned()
        }
        for (key, value) in store.scan(Table::Gateways)? {
            let gateway: GatewayRecord = decode(Table::Gateways, &value)?;
            if let Some(hash) = &gateway.credential_hash {
                state.credentials.insert(hash.clone(), gateway.id.clone());
            }
            state.gateways.insert(text(key), gateway);
        }
        for (key, value) in store.scan(Table::Enrollments)? {
            state
                .enrollments
                .insert(text(key), decode(Table::Enrollments, &value)?);
        }
        for (key, value) in store.scan(Table::Tokens)? {
            state
                .tokens
                .insert(text(key), decode(Table::Tokens, &value)?);
        }
        for (_, value) in store.scan(Table::Versions)? {
            let version: PipelineVersion = decode(Table::Versions, &value)?;
            state
                .versions
                .insert((version.pipeline.clone(), version.version), version);
        }
        for (_, value) in store.scan(Table::Deployments)? {
            let deployment: DeploymentRecord = decode(Table::Deployments, &value)?;
            let selector = Selector::parse(&deployment.selector)?;
            state.selectors.insert(deployment.name.clone(), selector);
            state
                .deployments
                .insert(deployment.name.clone(), deployment);
        }
        state.audit_seq = store
            .scan(Table::Audit)?
            .last()
            .and_then(|(key, _)| key.as_slice().try_into().ok())
            .map_or(0, u64::from_be_bytes);
        Ok(Self {
            store,
            signer,
            state: Mutex::new(state),
            heartbeat_interval,
            revisions: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes a change and its audit entry in one atomic, durable batch.
    fn commit(
        &self,
        state: &mut State,
        actor: &str,
        action: &str,
        detail: String,
        mut writes: Vec<Write>,
    ) -> Result<()> {
        writes.push(state.audit(actor, action, detail));
        self.store.write(writes)
    }

    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.signer.public_key()
    }

    /// Creates the first admin token when the store has none. `keep` stores it for the
    /// operator (the cloud writes `admin.token`) before the token is committed, so a failure
    /// there leaves no admin token that nobody can read. Returns the token once.
    pub fn bootstrap_admin(&self, keep: impl FnOnce(&str) -> Result<()>) -> Result<Option<String>> {
        let mut state = self.lock();
        if !state.tokens.is_empty() {
            return Ok(None);
        }
        let token = new_secret("wt_")?;
        keep(&token)?;
        let record = ApiToken {
            name: "admin".into(),
            role: Role::Admin,
            created_at_ms: now_ms(),
        };
        let hash = secret_hash(&token);
        self.commit(
            &mut state,
            "cloud",
            "token.create",
            "admin (admin), first start".into(),
            vec![put(Table::Tokens, hash.clone().into_bytes(), &record)],
        )?;
        state.tokens.insert(hash, record);
        Ok(Some(token))
    }

    /// The caller an API token belongs to.
    pub fn authenticate(&self, token: &str) -> Result<Caller> {
        let state = self.lock();
        state
            .tokens
            .get(&secret_hash(token))
            .map(|t| Caller {
                name: t.name.clone(),
                role: t.role,
            })
            .ok_or_else(|| CloudError::Unauthenticated("the API token is not valid".into()))
    }

    /// Creates an API token with `role`; returns the token, shown once.
    pub fn add_token(&self, caller: &Caller, name: &str, role: Role) -> Result<String> {
        caller.require(Role::Admin, "creating tokens")?;
        validate_name("token", name)?;
        let mut state = self.lock();
        if state.tokens.values().any(|t| t.name == name) {
            return Err(CloudError::Conflict(format!(
                "a token named '{name}' exists"
            )));
        }
        let token = new_secret("wt_")?;
        let hash = secret_hash(&token);
        let record = ApiToken {
            name: name.to_owned(),
            role,
            created_at_ms: now_ms(),
        };
        self.commit(
            &mut state,
            &caller.actor(),
            "token.create",
            format!("{name} ({role})"),
            vec![put(Table::Tokens, hash.clone().into_bytes(), &record)],
        )?;
        state.tokens.insert(hash, record);
        Ok(token)
    }

    /// Registers a gateway and returns it with a one-time enrollment token.
    pub fn add_gateway(
        &self,
        caller: &Caller,
        name: &str,
        labels: Labels,
    ) -> Result<(GatewayRecord, String)> {
        caller.require(Role::Admin, "adding gateways")?;
        validate_name("gateway", name)?;
        let mut state = self.lock();
        if state.gateways.values().any(|g| g.name == name) {
            return Err(CloudError::Conflict(format!(
                "a gateway named '{name}' exists; `weir cloud gateways enroll {name}` issues a new token for it"
            )));
        }
        let record = GatewayRecord {
            id: new_secret("gw_")?.chars().take(15).collect(),
            name: name.to_owned(),
            labels,
            credential_hash: None,
            created_at_ms: now_ms(),
            enrolled_at_ms: None,
            hostname: None,
            revoked: false,
            last_seen_ms: None,
        };
        let token = new_secret("we_")?;
        let enrollment = Enrollment {
            gateway_id: record.id.clone(),
            created_at_ms: now_ms(),
            used_at_ms: None,
        };
        let hash = secret_hash(&token);
        self.commit(
            &mut state,
            &caller.actor(),
            "gateway.add",
            format!("{name} {}", labels_text(&record.labels)),
            vec![
                put(Table::Gateways, record.id.clone().into_bytes(), &record),
                put(Table::Enrollments, hash.clone().into_bytes(), &enrollment),
            ],
        )?;
        state.enrollments.insert(hash, enrollment);
        state.gateways.insert(record.id.clone(), record.clone());
        Ok((record, token))
    }

    /// Issues a new one-time enrollment token for a known gateway, e.g. after a disk was lost.
    /// Its current credential keeps working until the gateway enrolls again.
    pub fn new_enrollment(&self, caller: &Caller, name: &str) -> Result<String> {
        caller.require(Role::Admin, "issuing enrollment tokens")?;
        let mut state = self.lock();
        let gateway = state.gateway_by_name(name)?.clone();
        if gateway.revoked {
            return Err(CloudError::Conflict(format!("gateway '{name}' is revoked")));
        }
        let token = new_secret("we_")?;
        let hash = secret_hash(&token);
        let enrollment = Enrollment {
            gateway_id: gateway.id.clone(),
            created_at_ms: now_ms(),
            used_at_ms: None,
        };
        // A new token replaces every earlier unused one: a leaked token stops working.
        let stale = state.unused_tokens_of(&gateway.id);
        let mut writes: Vec<Write> = token_deletes(&stale).collect();
        writes.push(put(
            Table::Enrollments,
            hash.clone().into_bytes(),
            &enrollment,
        ));
        self.commit(
            &mut state,
            &caller.actor(),
            "gateway.enrollment",
            name.to_owned(),
            writes,
        )?;
        state.forget_enrollments(&stale);
        state.enrollments.insert(hash, enrollment);
        Ok(token)
    }

    /// Exchanges a one-time token for the gateway's credential. Unknown, used and revoked
    /// tokens get the same answer, so the error tells a caller nothing about the fleet.
    pub fn enroll(&self, token: &str, hostname: &str) -> Result<EnrollResponse> {
        let rejected = || CloudError::Unauthenticated("the enrollment token is not valid".into());
        // What a caller calls itself goes into logs and the audit log: keep it short.
        let hostname: String = hostname
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect();
        let hostname = hostname.as_str();
        let mut state = self.lock();
        let hash = secret_hash(token);
        let Some(enrollment) = state.enrollments.get(&hash).cloned() else {
            tracing::warn!(hostname, "enrollment refused: unknown token");
            return Err(rejected());
        };
        // Refusals write nothing, so they cost the same whatever the reason and cannot be
        // used to fill the disk; the log says which it was.
        if enrollment.used_at_ms.is_some() {
            tracing::warn!(hostname, gateway = %enrollment.gateway_id, "enrollment refused: token already used");
            return Err(rejected());
        }
        if now_ms().saturating_sub(enrollment.created_at_ms) > ENROLLMENT_TOKEN_LIFETIME_MS {
            tracing::warn!(hostname, gateway = %enrollment.gateway_id, "enrollment refused: token expired");
            return Err(rejected());
        }
        let Some(mut gateway) = state.gateways.get(&enrollment.gateway_id).cloned() else {
            return Err(rejected());
        };
        if gateway.revoked {
            tracing::warn!(hostname, gateway = %gateway.name, "enrollment refused: gateway revoked");
            return Err(rejected());
        }
        let credential = format!("{}.{}", gateway.id, new_secret("")?);
        let credential_hash = secret_hash(&credential);
        let old_credential = gateway.credential_hash.replace(credential_hash.clone());
        gateway.enrolled_at_ms = Some(now_ms());
        gateway.hostname = Some(hostname.to_owned());
        let used = Enrollment {
            used_at_ms: Some(now_ms()),
            ..enrollment
        };
        // The gateway's other unused tokens go too: one enrollment, one credential.
        let stale: Vec<String> = state
            .unused_tokens_of(&gateway.id)
            .into_iter()
            .filter(|h| *h != hash)
            .collect();
        let mut writes = vec![
            put(Table::Gateways, gateway.id.clone().into_bytes(), &gateway),
            put(Table::Enrollments, hash.clone().into_bytes(), &used),
        ];
        writes.extend(token_deletes(&stale));
        self.commit(
            &mut state,
            &format!("gateway:{}", gateway.name),
            "gateway.enroll",
            format!("from host {hostname}"),
            writes,
        )?;
        state.forget_enrollments(&stale);
        if let Some(old) = old_credential {
            state.credentials.remove(&old);
        }
        // A stream opened with the old credential ends with it.
        state.sessions.remove(&gateway.id);
        state.enrollments.insert(hash, used);
        state
            .credentials
            .insert(credential_hash, gateway.id.clone());
        state.gateways.insert(gateway.id.clone(), gateway.clone());
        tracing::info!(gateway = %gateway.name, hostname, "gateway enrolled");
        Ok(EnrollResponse {
            gateway_id: gateway.id,
            name: gateway.name,
            credential,
            plan_public_key: self.signer.public_key(),
            labels: gateway.labels.into_iter().collect(),
        })
    }

    /// The gateway a credential belongs to.
    pub fn authenticate_gateway(&self, credential: &str) -> Result<GatewayRecord> {
        let state = self.lock();
        state
            .credentials
            .get(&secret_hash(credential))
            .and_then(|id| state.gateways.get(id))
            .filter(|g| !g.revoked)
            .cloned()
            .ok_or_else(|| {
                CloudError::Unauthenticated(
                    "the gateway credential is not valid; enroll again with a new token".into(),
                )
            })
    }

    /// Sets and removes labels of a gateway; its desired state follows at once.
    pub fn relabel(
        &self,
        caller: &Caller,
        name: &str,
        set: Labels,
        remove: &[String],
    ) -> Result<GatewayRecord> {
        caller.require(Role::Admin, "labelling gateways")?;
        let mut state = self.lock();
        let mut gateway = state.gateway_by_name(name)?.clone();
        for key in remove {
            gateway.labels.remove(key);
        }
        gateway.labels.extend(set);
        self.commit(
            &mut state,
            &caller.actor(),
            "gateway.label",
            format!("{name} {}", labels_text(&gateway.labels)),
            vec![put(
                Table::Gateways,
                gateway.id.clone().into_bytes(),
                &gateway,
            )],
        )?;
        state.gateways.insert(gateway.id.clone(), gateway.clone());
        self.reconcile(&mut state, &gateway.id);
        Ok(gateway)
    }

    /// Revokes a gateway: its credential stops working and its stream is closed.
    pub fn revoke(&self, caller: &Caller, name: &str) -> Result<()> {
        caller.require(Role::Admin, "revoking gateways")?;
        let mut state = self.lock();
        let mut gateway = state.gateway_by_name(name)?.clone();
        gateway.revoked = true;
        let credential = gateway.credential_hash.take();
        let stale = state.unused_tokens_of(&gateway.id);
        let mut writes: Vec<Write> = token_deletes(&stale).collect();
        writes.push(put(
            Table::Gateways,
            gateway.id.clone().into_bytes(),
            &gateway,
        ));
        self.commit(
            &mut state,
            &caller.actor(),
            "gateway.revoke",
            name.to_owned(),
            writes,
        )?;
        if let Some(hash) = credential {
            state.credentials.remove(&hash);
        }
        state.forget_enrollments(&stale);
        state.sessions.remove(&gateway.id);
        state.gateways.insert(gateway.id.clone(), gateway);
        Ok(())
    }

    /// Compiles `request.sql`, stores a new signed version of every pipeline whose SQL
    /// changed, creates or updates the deployment, and sends the result to every gateway it
    /// concerns.
    pub fn deploy(&self, caller: &Caller, request: DeployRequest) -> Result<DeployOutcome> {
        caller.require(Role::Deployer, "deploying")?;
        let selector = Selector::parse(&request.selector)?;
        let compiled =
            weir_planner::compile(&request.sql).map_err(|error| CloudError::Compile {
                rendered: error.render(&request.file),
                diagnostics: error.diagnostics,
            })?;
        if compiled.pipelines.is_empty() {
            return Err(CloudError::Invalid(format!(
                "{}: defines no pipeline; add CREATE PIPELINE name AS INSERT INTO sink SELECT ...",
                request.file
            )));
        }
        let name = request
            .name
            .clone()
            .unwrap_or_else(|| compiled.pipelines[0].name.clone());
        validate_name("deployment", &name)?;
        let mut state = self.lock();
        let previous = state.deployments.get(&name).cloned();
        let now = now_ms();
        let mut writes = Vec::new();
        let mut pipelines = BTreeMap::new();
        let mut changed = Vec::new();
        let mut new_versions = Vec::new();
        let mut fresh = BTreeMap::new();
        for plan in compiled.pipelines {
            let current = previous
                .as_ref()
                .and_then(|d| d.pipelines.get(&plan.name))
                .and_then(|v| state.versions.get(&(plan.name.clone(), *v)));
            if let Some(current) = current.filter(|c| c.sql == request.sql) {
                pipelines.insert(plan.name.clone(), current.version);
                continue;
            }
            // Gateways may run any version of this pipeline that a deployment holds.
            let running: std::collections::BTreeSet<u64> = state
                .deployments
                .values()
                .filter_map(|d| d.pipelines.get(&plan.name).copied())
                .collect();
            for version in running {
                if let Some(record) = state.versions.get(&(plan.name.clone(), version))
                    && let Some(reason) = state_loss(&decode_plan(&record.payload)?, &plan)
                {
                    fresh.insert(plan.name.clone(), reason);
                }
            }
            let version = state.max_version(&plan.name) + 1;
            let envelope = PlanEnvelope {
                pipeline: plan.name.clone(),
                version,
                deployment: name.clone(),
                sql: request.sql.clone(),
                signed_at_ms: now,
                plan: Some(plan.clone()),
                fresh: fresh.contains_key(&plan.name),
            };
            let signed = self.signer.sign(&envelope);
            let record = PipelineVersion {
                pipeline: plan.name.clone(),
                version,
                deployment: name.clone(),
                sql: request.sql.clone(),
                payload: signed.payload,
                signature: signed.signature,
                created_at_ms: now,
                created_by: caller.actor(),
            };
            writes.push(put(
                Table::Versions,
                version_key(&plan.name, version),
                &record,
            ));
            pipelines.insert(plan.name.clone(), version);
            changed.push(plan.name.clone());
            new_versions.push(record);
        }
        if !request.fresh && !fresh.is_empty() {
            return Err(state_loss_refused(&fresh));
        }
        let mut history = previous
            .as_ref()
            .map(|d| d.history.clone())
            .unwrap_or_default();
        // A rollout still baking never reached everyone: what everyone runs is its stable set.
        let everywhere = previous.as_ref().map(|d| {
            d.rollout
                .as_ref()
                .map_or(&d.pipelines, |r| &r.stable)
                .clone()
        });
        if let Some(everywhere) = &everywhere
            && *everywhere != pipelines
            && history.last() != Some(everywhere)
            && !everywhere.is_empty()
        {
            history.push(everywhere.clone());
        }
        let targets: Vec<&GatewayRecord> = state
            .gateways
            .values()
            .filter(|g| !g.revoked && selector.matches(&g.labels))
            .collect();
        let staged = request.canary > 0 && !changed.is_empty();
        // Deploying the same SQL again during a rollout must not skip its bake.
        let unfinished = previous
            .as_ref()
            .and_then(|d| d.rollout.clone())
            .filter(|_| changed.is_empty());
        let rollout = unfinished.or_else(|| {
            staged.then(|| {
                // Online gateways make better canaries: they report back at once.
                let mut candidates: Vec<&GatewayRecord> = targets.clone();
                candidates.sort_by_key(|g| (!state.sessions.contains_key(&g.id), g.name.clone()));
                Rollout {
                    canaries: candidates
                        .iter()
                        .take(request.canary as usize)
                        .map(|g| g.id.clone())
                        .collect(),
                    stable: everywhere.clone().unwrap_or_default(),
                    started_at_ms: now,
                    bake_ms: request.bake.as_millis() as u64,
                    max_errors: request.max_errors,
                    healthy_since_ms: BTreeMap::new(),
                }
            })
        });
        let canaries: Vec<String> = rollout.as_ref().map_or_else(Vec::new, |r| {
            r.canaries
                .iter()
                .filter_map(|id| state.gateways.get(id).map(|g| g.name.clone()))
                .collect()
        });
        let targets: Vec<String> = targets.iter().map(|g| g.name.clone()).collect();
        let record = DeploymentRecord {
            name: name.clone(),
            selector: selector.to_string(),
            priority: request.priority,
            pipelines: pipelines.clone(),
            history,
            created_at_ms: previous.as_ref().map_or(now, |d| d.created_at_ms),
            updated_at_ms: now,
            updated_by: caller.actor(),
            rollout,
            failure: None,
        };
        let detail = format!(
            "{name} selector '{}' priority {} pipelines {}{}",
            record.selector,
            record.priority,
            versions_text(&pipelines),
            if canaries.is_empty() {
                String::new()
            } else {
                format!(
                    " canaries {} bake {} ms",
                    canaries.join(","),
                    request.bake.as_millis()
                )
            }
        );
        writes.push(put(Table::Deployments, name.clone().into_bytes(), &record));
        self.commit(&mut state, &caller.actor(), "deploy", detail, writes)?;
        for version in new_versions {
            state
                .versions
                .insert((version.pipeline.clone(), version.version), version);
        }
        state.selectors.insert(name.clone(), selector.clone());
        state.deployments.insert(name.clone(), record);
        self.reconcile_all(&mut state);
        tracing::info!(deployment = %name, pipelines = %versions_text(&pipelines), "deployed");
        Ok(DeployOutcome {
            deployment: name,
            pipelines,
            changed,
            targets,
            canaries,
            fresh,
        })
    }

    /// Returns a deployment to its previous set of versions, as new versions (a gateway
    /// never goes back to a lower version number, so a rollback re-signs the old plans).
    /// Going back to versions that cannot take over the running ones' state needs `fresh`.
    pub fn rollback(&self, caller: &Caller, name: &str, fresh: bool) -> Result<DeployOutcome> {
        caller.require(Role::Deployer, "rolling back")?;
        let mut state = self.lock();
        let Some(mut deployment) = state.deployments.get(name).cloned() else {
            return Err(CloudError::NotFound(format!(
                "no deployment named '{name}'"
            )));
        };
        let Some(target) = deployment.history.pop() else {
            return Err(CloudError::Conflict(format!(
                "deployment '{name}' has no earlier version to roll back to"
            )));
        };
        let losses = state.state_losses(&deployment.pipelines, &target)?;
        if !fresh && !losses.is_empty() {
            return Err(state_loss_refused(&losses));
        }
        let Resigned {
            pipelines,
            mut writes,
            records: new_versions,
        } = self.resign(&state, &target, &caller.actor(), !losses.is_empty())?;
        deployment.pipelines = pipelines.clone();
        deployment.rollout = None;
        deployment.updated_at_ms = now_ms();
        deployment.updated_by = caller.actor();
        let detail = format!(
            "{name} to {} as {}",
            versions_text(&target),
            versions_text(&pipelines)
        );
        writes.push(put(
            Table::Deployments,
            name.as_bytes().to_vec(),
            &deployment,
        ));
        self.commit(&mut state, &caller.actor(), "rollback", detail, writes)?;
        for version in new_versions {
            state
                .versions
                .insert((version.pipeline.clone(), version.version), version);
        }
        let selector = state.selectors.get(name).cloned().unwrap_or_default();
        state.deployments.insert(name.to_owned(), deployment);
        let targets = state
            .gateways
            .values()
            .filter(|g| !g.revoked && selector.matches(&g.labels))
            .map(|g| g.name.clone())
            .collect();
        self.reconcile_all(&mut state);
        Ok(DeployOutcome {
            deployment: name.to_owned(),
            changed: pipelines.keys().cloned().collect(),
            pipelines,
            targets,
            canaries: Vec::new(),
            fresh: losses,
        })
    }

    /// New versions carrying the plans of `set`, signed now: how the fleet goes back without
    /// a version number ever going down. `fresh` lets them replace versions whose state they
    /// cannot take over; without it, each keeps the permission its plan was signed with.
    fn resign(
        &self,
        state: &State,
        set: &BTreeMap<String, u64>,
        actor: &str,
        fresh: bool,
    ) -> Result<Resigned> {
        let now = now_ms();
        let mut pipelines = BTreeMap::new();
        let mut writes = Vec::new();
        let mut records = Vec::new();
        for (pipeline, old_version) in set {
            let Some(old) = state
                .versions
                .get(&(pipeline.clone(), *old_version))
                .cloned()
            else {
                return Err(CloudError::Storage(format!(
                    "version {old_version} of pipeline '{pipeline}' is missing"
                )));
            };
            let envelope = decode_envelope(&old.payload)?;
            let version = state.max_version(pipeline) + 1;
            let signed = self.signer.sign(&PlanEnvelope {
                version,
                signed_at_ms: now,
                fresh: fresh || envelope.fresh,
                ..envelope
            });
            let record = PipelineVersion {
                version,
                payload: signed.payload,
                signature: signed.signature,
                created_at_ms: now,
                created_by: actor.to_owned(),
                ..old
            };
            writes.push(put(
                Table::Versions,
                version_key(pipeline, version),
                &record,
            ));
            pipelines.insert(pipeline.clone(), version);
            records.push(record);
        }
        Ok(Resigned {
            pipelines,
            writes,
            records,
        })
    }

    /// Advances every staged rollout: promotes it once each canary ran the new versions
    /// healthily for the bake time, or rolls the canaries back when one fails. Called about
    /// once a second by the cloud.
    pub fn check_rollouts(&self) {
        let mut state = self.lock();
        let now = now_ms();
        let names: Vec<String> = state
            .deployments
            .values()
            .filter(|d| d.rollout.is_some())
            .map(|d| d.name.clone())
            .collect();
        for name in names {
            let Some(mut deployment) = state.deployments.get(&name).cloned() else {
                continue;
            };
            let Some(rollout) = deployment.rollout.as_mut() else {
                continue;
            };
            let mut failure = None;
            for canary in &rollout.canaries {
                let gateway = state
                    .gateways
                    .get(canary)
                    .map_or(canary.clone(), |g| g.name.clone());
                match canary_health(
                    state.sessions.get(canary),
                    &deployment.pipelines,
                    rollout.max_errors,
                ) {
                    CanaryHealth::Healthy => {
                        rollout
                            .healthy_since_ms
                            .entry(canary.clone())
                            .or_insert(now);
                    }
                    CanaryHealth::Pending => {
                        rollout.healthy_since_ms.remove(canary);
                    }
                    CanaryHealth::Failed(why) => {
                        failure = Some(format!("canary {gateway}: {why}"));
                        break;
                    }
                }
            }
            // A canary that never comes up healthy fails the rollout rather than hold it forever.
            let patience = rollout.bake_ms.saturating_mul(2).saturating_add(60_000);
            if failure.is_none() && now.saturating_sub(rollout.started_at_ms) > patience {
                failure = Some(format!(
                    "the canaries did not run the new versions healthily within {} s",
                    patience / 1000
                ));
            }
            let baked = rollout.canaries.iter().all(|c| {
                rollout
                    .healthy_since_ms
                    .get(c)
                    .is_some_and(|since| now.saturating_sub(*since) >= rollout.bake_ms)
            });
            let mut writes = Vec::new();
            let mut new_versions = Vec::new();
            let (action, detail) = if let Some(reason) = failure {
                let stable = rollout.stable.clone();
                let resigned = match self.resign(&state, &stable, "cloud", true) {
                    Ok(resigned) => resigned,
                    Err(error) => {
                        tracing::error!(deployment = %name, %error, "cannot roll the canaries back; retrying");
                        continue;
                    }
                };
                let Resigned {
                    pipelines,
                    writes: resigned,
                    records,
                } = resigned;
                tracing::warn!(deployment = %name, %reason, "staged rollout failed; rolling the canaries back");
                writes.extend(resigned);
                new_versions = records;
                if deployment.history.last() == Some(&stable) {
                    deployment.history.pop();
                }
                deployment.pipelines = pipelines;
                deployment.rollout = None;
                deployment.failure = Some(reason.clone());
                ("rollout.fail", format!("{name}: {reason}"))
            } else if baked {
                deployment.rollout = None;
                deployment.failure = None;
                tracing::info!(deployment = %name, "canaries healthy; rolling out to every gateway");
                (
                    "rollout.promote",
                    format!("{name}: {}", versions_text(&deployment.pipelines)),
                )
            } else {
                // Still baking: keep the health timestamps in memory only.
                state.deployments.insert(name.clone(), deployment);
                continue;
            };
            writes.push(put(
                Table::Deployments,
                name.clone().into_bytes(),
                &deployment,
            ));
            if let Err(error) = self.commit(&mut state, "cloud", action, detail, writes) {
                tracing::error!(deployment = %name, %error, "rollout step not stored; retrying");
                continue;
            }
            for version in new_versions {
                state
                    .versions
                    .insert((version.pipeline.clone(), version.version), version);
            }
            state.deployments.insert(name.clone(), deployment);
            self.reconcile_all(&mut state);
        }
    }

    fn reconcile_all(&self, state: &mut State) {
        let ids: Vec<String> = state.sessions.keys().cloned().collect();
        for id in ids {
            self.reconcile(state, &id);
        }
    }

    /// Brings a connected gateway's desired state up to date (see [`Self::send_desired`]),
    /// first lifting any version that would take it backwards.
    fn reconcile(&self, state: &mut State, gateway_id: &str) {
        if self.lift_below_running(state, gateway_id) {
            // A lifted version changed a deployment that other gateways follow too.
            let ids: Vec<String> = state.sessions.keys().cloned().collect();
            for id in ids {
                self.send_desired(state, &id);
            }
        } else {
            self.send_desired(state, gateway_id);
        }
    }

    /// A gateway never goes back to a lower version number. When labels or priorities hand
    /// it a pipeline from another deployment at a lower number than the one it runs, the
    /// chosen plan is re-signed under a new number, for every gateway that deployment
    /// reaches. (A lower number from the same deployment, say from a cloud restored from an
    /// old backup, is sent as it is, and the gateway refuses it.) Returns whether anything
    /// was lifted.
    fn lift_below_running(&self, state: &mut State, gateway_id: &str) -> bool {
        let Some(labels) = state.gateways.get(gateway_id).map(|g| g.labels.clone()) else {
            return false;
        };
        let Some(running) = state.sessions.get(gateway_id).map(|s| s.running.clone()) else {
            return false;
        };
        let mut lifted = false;
        for (pipeline, (version, deployment)) in state.desired_for(gateway_id, &labels) {
            let Some(&current) = running.get(&pipeline) else {
                continue;
            };
            let from_elsewhere = state
                .versions
                .get(&(pipeline.clone(), current))
                .is_some_and(|v| v.deployment != deployment);
            if current <= version || !from_elsewhere {
                continue;
            }
            match self.lift(state, &deployment, &pipeline, version) {
                Ok(()) => lifted = true,
                Err(error) => {
                    tracing::error!(%deployment, %pipeline, %error, "cannot re-sign a version above what a gateway runs");
                }
            }
        }
        lifted
    }

    fn lift(
        &self,
        state: &mut State,
        deployment: &str,
        pipeline: &str,
        version: u64,
    ) -> Result<()> {
        let Some(mut record) = state.deployments.get(deployment).cloned() else {
            return Ok(());
        };
        let set = BTreeMap::from([(pipeline.to_owned(), version)]);
        let Resigned {
            pipelines,
            mut writes,
            records,
        } = self.resign(state, &set, "cloud", false)?;
        let lifted = pipelines.get(pipeline).copied().unwrap_or(version);
        if record.pipelines.get(pipeline) == Some(&version) {
            record.pipelines.insert(pipeline.to_owned(), lifted);
        }
        if let Some(rollout) = record.rollout.as_mut()
            && rollout.stable.get(pipeline) == Some(&version)
        {
            rollout.stable.insert(pipeline.to_owned(), lifted);
        }
        writes.push(put(
            Table::Deployments,
            deployment.as_bytes().to_vec(),
            &record,
        ));
        self.commit(
            state,
            "cloud",
            "version.lift",
            format!("{deployment}: {pipeline} v{version} re-signed as v{lifted}, above what a gateway runs"),
            writes,
        )?;
        for version in records {
            state
                .versions
                .insert((version.pipeline.clone(), version.version), version);
        }
        state.deployments.insert(deployment.to_owned(), record);
        Ok(())
    }

    /// Sends a connected gateway its desired state if it differs from what it was sent.
    fn send_desired(&self, state: &mut State, gateway_id: &str) {
        let Some(labels) = state.gateways.get(gateway_id).map(|g| g.labels.clone()) else {
            return;
        };
        let desired = state.desired_for(gateway_id, &labels);
        let versions: BTreeMap<String, u64> =
            desired.iter().map(|(p, (v, _))| (p.clone(), *v)).collect();
        let plans: Vec<SignedPlan> = desired
            .iter()
            .filter_map(|(pipeline, (version, _))| {
                state
                    .versions
                    .get(&(pipeline.clone(), *version))
                    .map(|v| SignedPlan {
                        payload: v.payload.clone(),
                        signature: v.signature.clone(),
                    })
            })
            .collect();
        let Some(session) = state.sessions.get_mut(gateway_id) else {
            return;
        };
        if session.revision != 0 && session.sent == versions {
            return;
        }
        // Revisions follow the clock in microseconds (or the last one plus one), so they keep
        // growing across cloud restarts and gateways can refuse a replayed desired state.
        let floor = now_ms().saturating_mul(1000);
        let revision = self
            .revisions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some((last + 1).max(floor))
            })
            .map_or(floor, |last| (last + 1).max(floor));
        let (manifest, manifest_signature) = self.signer.sign_manifest(&DesiredManifest {
            gateway_id: gateway_id.to_owned(),
            revision,
            plans: versions
                .iter()
                .map(|(name, version)| RunningPipeline {
                    name: name.clone(),
                    version: *version,
                })
                .collect(),
        });
        session.revision = revision;
        session.sent = versions;
        session.results.clear();
        session.desired.send_replace(Some(DesiredState {
            revision,
            plans,
            manifest,
            manifest_signature,
        }));
    }

    /// Registers a gateway's new stream; returns its connection id, the welcome message and
    /// the receiver of its desired state. A stream the gateway already had is replaced.
    pub fn connect(
        &self,
        gateway: &GatewayRecord,
        running: Vec<RunningPipeline>,
    ) -> Result<(u64, Welcome, watch::Receiver<Option<DesiredState>>)> {
        let mut state = self.lock();
        // Revoked or re-enrolled while the stream waited for its Hello: refuse it now.
        let current = state
            .gateways
            .get(&gateway.id)
            .is_some_and(|g| !g.revoked && g.credential_hash == gateway.credential_hash);
        if !current {
            return Err(CloudError::Unauthenticated(
                "the gateway credential is not valid; enroll again with a new token".into(),
            ));
        }
        state.next_connection += 1;
        let connection = state.next_connection;
        let (desired, receiver) = watch::channel(None);
        let running: BTreeMap<String, u64> =
            running.into_iter().map(|p| (p.name, p.version)).collect();
        tracing::debug!(gateway = %gateway.name, running = %versions_text(&running), "hello");
        state.sessions.insert(
            gateway.id.clone(),
            Session {
                connection,
                desired,
                sent: BTreeMap::new(),
                revision: 0,
                connected_at_ms: now_ms(),
                report: None,
                running,
                reported_at: Instant::now(),
                earlier: None,
                results: BTreeMap::new(),
            },
        );
        state.last_seen_ms.insert(gateway.id.clone(), now_ms());
        self.reconcile(&mut state, &gateway.id);
        let welcome = Welcome {
            gateway_id: gateway.id.clone(),
            name: gateway.name.clone(),
            labels: gateway.labels.clone().into_iter().collect(),
            heartbeat_interval_ms: self.heartbeat_interval.as_millis() as u32,
        };
        Ok((connection, welcome, receiver))
    }

    /// Notes a message from a gateway's stream; `false` if the stream was replaced or revoked.
    pub fn seen(&self, gateway_id: &str, connection: u64, update: SessionUpdate) -> bool {
        let mut state = self.lock();
        let Some(session) = state.sessions.get_mut(gateway_id) else {
            return false;
        };
        if session.connection != connection {
            return false;
        }
        match update {
            SessionUpdate::Heartbeat => {}
            SessionUpdate::Status(report) => {
                let streams = report.streams.clone();
                session.running = report
                    .pipelines
                    .iter()
                    .filter(|p| p.version > 0)
                    .map(|p| (p.name.clone(), p.version))
                    .collect();
                let now = Instant::now();
                let keep_earlier = session
                    .earlier
                    .as_ref()
                    .is_some_and(|(at, _)| now.duration_since(*at) < Duration::from_secs(1));
                if let Some(previous) = session.report.replace(report)
                    && !keep_earlier
                {
                    session.earlier = Some((session.reported_at, previous));
                }
                session.reported_at = now;
                state.uplink.insert(gateway_id.to_owned(), streams);
            }
            SessionUpdate::Ack(ack) => {
                if ack.revision == session.revision {
                    for result in ack.results {
                        if !result.accepted {
                            tracing::warn!(
                                gateway = gateway_id,
                                pipeline = %result.pipeline,
                                version = result.version,
                                reason = %result.reason,
                                "gateway rejected a plan"
                            );
                        }
                        session.results.insert(result.pipeline.clone(), result);
                    }
                }
            }
        }
        state.last_seen_ms.insert(gateway_id.to_owned(), now_ms());
        true
    }

    /// Ends a gateway's stream, unless a newer one replaced it meanwhile.
    pub fn disconnect(&self, gateway_id: &str, connection: u64, why: &str) {
        let mut state = self.lock();
        if state
            .sessions
            .get(gateway_id)
            .is_some_and(|s| s.connection == connection)
        {
            state.sessions.remove(gateway_id);
            let name = state
                .gateways
                .get(gateway_id)
                .map_or(gateway_id.to_owned(), |g| g.name.clone());
            tracing::info!(gateway = %name, why, "gateway disconnected");
        }
    }

    /// Every gateway with what it should run and what it reports.
    pub fn status(&self) -> Vec<GatewayView> {
        let state = self.lock();
        state
            .gateways
            .values()
            .map(|gateway| {
                let session = state.sessions.get(&gateway.id);
                let desired = if gateway.revoked {
                    BTreeMap::new()
                } else {
                    state.desired_for(&gateway.id, &gateway.labels)
                };
                let reported: BTreeMap<&str, &weir_proto::cloud::PipelineStatus> = session
                    .and_then(|s| s.report.as_ref())
                    .map(|r| r.pipelines.iter().map(|p| (p.name.as_str(), p)).collect())
                    .unwrap_or_default();
                let mut names: Vec<&str> = desired.keys().map(String::as_str).collect();
                names.extend(reported.keys().filter(|n| !desired.contains_key(**n)));
                names.sort_unstable();
                names.dedup();
                let pipelines = names
                    .into_iter()
                    .map(|name| {
                        let wanted = desired.get(name);
                        let report = reported.get(name);
                        let result = session.and_then(|s| s.results.get(name));
                        let reported_version = report.map(|r| r.version).filter(|v| *v > 0);
                        let rate = |count: fn(&weir_proto::cloud::PipelineStatus) -> u64| {
                            let session = session?;
                            let now = report?;
                            let (at, earlier) = session.earlier.as_ref()?;
                            let then = earlier
                                .pipelines
                                .iter()
                                .find(|p| p.name == now.name && p.version == now.version)?;
                            let seconds = session.reported_at.duration_since(*at).as_secs_f64();
                            let grown = count(now).checked_sub(count(then))?;
                            (seconds > 0.0).then(|| grown as f64 / seconds)
                        };
                        PipelineView {
                            name: name.to_owned(),
                            deployment: wanted.map(|(_, d)| d.clone()),
                            desired_version: wanted.map(|(v, _)| *v),
                            reported_version,
                            state: report.map(|r| r.state.clone()),
                            error: report.map(|r| r.error.clone()).filter(|e| !e.is_empty()),
                            rejected: result.filter(|r| !r.accepted).map(|r| r.reason.clone()),
                            rows_in: report.map_or(0, |r| r.rows_in),
                            rows_out: report.map_or(0, |r| r.rows_out),
                            rows_in_per_s: rate(|p| p.rows_in),
                            rows_out_per_s: rate(|p| p.rows_out),
                            errors: report.map_or(0, |r| r.errors),
                            restarts: report.map_or(0, |r| r.restarts),
                            p50_ms: report.map(|r| r.p50_ms),
                            p99_ms: report.map(|r| r.p99_ms),
                            in_sync: session.is_some()
                                && wanted.map(|(v, _)| *v) == reported_version
                                && report
                                    .is_some_and(|r| r.state == "running" || r.state == "finished"),
                        }
                    })
                    .collect();
                GatewayView {
                    name: gateway.name.clone(),
                    id: gateway.id.clone(),
                    labels: gateway.labels.clone(),
                    enrolled: gateway.credential_hash.is_some(),
                    revoked: gateway.revoked,
                    online: session.is_some(),
                    connected_since_ms: session.map(|s| s.connected_at_ms),
                    last_seen_ms: state.last_seen_ms.get(&gateway.id).copied(),
                    uptime_s: session.and_then(|s| s.report.as_ref()).map(|r| r.uptime_s),
                    pipelines,
                    streams: state
                        .uplink
                        .get(&gateway.id)
                        .map(|streams| streams.iter().map(StreamView::from).collect())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Ends every gateway stream (the cloud is stopping).
    pub fn close_sessions(&self) {
        self.lock().sessions.clear();
    }

    pub fn deployments(&self) -> Vec<DeploymentView> {
        let state = self.lock();
        state
            .deployments
            .values()
            .map(|d| {
                let selector = state.selectors.get(&d.name).cloned().unwrap_or_default();
                DeploymentView {
                    name: d.name.clone(),
                    selector: d.selector.clone(),
                    priority: d.priority,
                    pipelines: d.pipelines.clone(),
                    rollback_to: d.history.last().cloned(),
                    targets: state
                        .gateways
                        .values()
                        .filter(|g| !g.revoked && selector.matches(&g.labels))
                        .map(|g| g.name.clone())
                        .collect(),
                    updated_at_ms: d.updated_at_ms,
                    updated_by: d.updated_by.clone(),
                    rollout: d.rollout.as_ref().map(|r| RolloutView {
                        canaries: r
                            .canaries
                            .iter()
                            .filter_map(|id| state.gateways.get(id).map(|g| g.name.clone()))
                            .collect(),
                        stable: r.stable.clone(),
                        bake_s: r.bake_ms / 1000,
                        baked_s: r
                            .healthy_since_ms
                            .values()
                            .min()
                            .filter(|_| r.healthy_since_ms.len() == r.canaries.len())
                            .map_or(0, |since| now_ms().saturating_sub(*since) / 1000),
                    }),
                    failure: d.failure.clone(),
                }
            })
            .collect()
    }

    pub fn versions(&self, pipeline: Option<&str>) -> Vec<VersionView> {
        let state = self.lock();
        state
            .versions
            .values()
            .filter(|v| pipeline.is_none_or(|p| v.pipeline == p))
            .map(|v| VersionView {
                pipeline: v.pipeline.clone(),
                version: v.version,
                deployment: v.deployment.clone(),
                sql: v.sql.clone(),
                created_at_ms: v.created_at_ms,
                created_by: v.created_by.clone(),
            })
            .collect()
    }

    /// The audit log, oldest first.
    pub fn audit_log(&self, caller: &Caller) -> Result<Vec<AuditEntry>> {
        caller.require(Role::Admin, "reading the audit log")?;
        self.store
            .scan(Table::Audit)?
            .into_iter()
            .map(|(_, value)| {
                serde_json::from_slice(&value).map_err(|error| {
                    CloudError::Storage(format!("an audit entry cannot be read: {error}"))
                })
            })
            .collect()
    }

    /// How many gateway streams are open.
    pub fn online(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Writes when each gateway was last seen, so a restarted cloud still shows it.
    pub fn persist_last_seen(&self) -> Result<()> {
        let state = self.lock();
        let writes: Vec<Write> = state
            .gateways
            .values()
            .filter_map(|g| {
                let seen = state.last_seen_ms.get(&g.id).copied()?;
                let mut record = g.clone();
                record.last_seen_ms = Some(seen);
                Some(put(Table::Gateways, g.id.clone().into_bytes(), &record))
            })
            .collect();
        if writes.is_empty() {
            return Ok(());
        }
        self.store.write(writes)
    }

    /// Seeds the in-memory last-seen times from the store.
    pub fn restore_last_seen(&self) {
        let mut state = self.lock();
        let seen: Vec<(String, u64)> = state
            .gateways
            .values()
            .filter_map(|g| g.last_seen_ms.map(|t| (g.id.clone(), t)))
            .collect();
        state.last_seen_ms.extend(seen);
    }
}

/// New signed versions of old plans, and the writes that store them.
struct Resigned {
    /// Pipeline -> its new version.
    pipelines: BTreeMap<String, u64>,
    writes: Vec<Write>,
    records: Vec<PipelineVersion>,
}

enum CanaryHealth {
    Healthy,
    /// Not (yet) running every new version: offline, starting, or not reported.
    Pending,
    Failed(String),
}

/// How a canary is doing with `versions`, from its last acknowledgement and status report.
fn canary_health(
    session: Option<&Session>,
    versions: &BTreeMap<String, u64>,
    max_errors: u64,
) -> CanaryHealth {
    let Some(session) = session else {
        return CanaryHealth::Pending;
    };
    for (pipeline, version) in versions {
        if let Some(result) = session.results.get(pipeline)
            && result.version == *version
            && !result.accepted
        {
            return CanaryHealth::Failed(format!(
                "refused {pipeline} v{version}: {}",
                result.reason
            ));
        }
    }
    let Some(report) = &session.report else {
        return CanaryHealth::Pending;
    };
    let mut healthy = true;
    for (pipeline, version) in versions {
        let Some(status) = report
            .pipelines
            .iter()
            .find(|p| &p.name == pipeline && p.version == *version)
        else {
            healthy = false;
            continue;
        };
        let error = if status.error.is_empty() {
            String::new()
        } else {
            format!(": {}", status.error)
        };
        if status.state == "failed" || status.state == "restarting" || status.restarts > 0 {
            return CanaryHealth::Failed(format!(
                "{pipeline} v{version} is {} after {} restart(s){error}",
                status.state, status.restarts
            ));
        }
        if status.errors > max_errors {
            return CanaryHealth::Failed(format!(
                "{pipeline} v{version} counted {} errors (more than {max_errors})",
                status.errors
            ));
        }
        healthy &= status.state == "running" || status.state == "finished";
    }
    if healthy {
        CanaryHealth::Healthy
    } else {
        CanaryHealth::Pending
    }
}

/// What a gateway's stream said.
pub enum SessionUpdate {
    Heartbeat,
    Status(StatusReport),
    Ack(weir_proto::cloud::PlanAck),
}

/// The plan inside a stored, signed envelope.
fn decode_plan(payload: &[u8]) -> Result<PipelinePlan> {
    decode_envelope(payload)?
        .plan
        .ok_or_else(|| CloudError::Storage("a stored version has no plan".into()))
}

/// The error for a deploy or rollback that would lose pipelines' state without `--fresh`.
fn state_loss_refused(losses: &BTreeMap<String, String>) -> CloudError {
    let each: Vec<String> = losses
        .iter()
        .map(|(pipeline, reason)| format!("pipeline '{pipeline}': {reason}"))
        .collect();
    CloudError::Conflict(format!(
        "the new versions cannot take over the running versions' state ({}), so open windows \
         and detector history would start empty on every gateway. Nothing was changed; run \
         again with --fresh to accept that",
        each.join("; ")
    ))
}

fn decode_envelope(payload: &[u8]) -> Result<PlanEnvelope> {
    use prost::Message as _;
    PlanEnvelope::decode(payload)
        .map_err(|error| CloudError::Storage(format!("a stored plan cannot be decoded: {error}")))
}

fn labels_text(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn versions_text(versions: &BTreeMap<String, u64>) -> String {
    versions
        .iter()
        .map(|(p, v)| format!("{p}@{v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A gateway in `weir status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct GatewayView {
    pub name: String,
    pub id: String,
    pub labels: Labels,
    pub enrolled: bool,
    pub revoked: bool,
    pub online: bool,
    pub connected_since_ms: Option<u64>,
    pub last_seen_ms: Option<u64>,
    pub uptime_s: Option<u64>,
    pub pipelines: Vec<PipelineView>,
    /// The gateway's uplink streams as last reported, with what the cloud stored of them.
    #[serde(default)]
    pub streams: Vec<StreamView>,
}

/// One uplink stream of a gateway: its backlog as the gateway reported it, and what the
/// cloud stored.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct StreamView {
    pub stream: String,
    pub priority: String,
    pub pending: u64,
    pub pending_bytes: u64,
    pub oldest_pending_age_ms: u64,
    pub dropped_oldest: u64,
    pub refused_newest: u64,
    pub expired: u64,
    pub merged: u64,
    /// Filled in from the result store.
    pub last_stored_seq: Option<u64>,
    pub duplicates: u64,
}

impl From<&weir_proto::cloud::StreamStatus> for StreamView {
    fn from(s: &weir_proto::cloud::StreamStatus) -> Self {
        Self {
            stream: s.stream.clone(),
            priority: s.priority.clone(),
            pending: s.pending,
            pending_bytes: s.pending_bytes,
            oldest_pending_age_ms: s.oldest_pending_age_ms,
            dropped_oldest: s.dropped_oldest,
            refused_newest: s.refused_newest,
            expired: s.expired,
            merged: s.merged,
            last_stored_seq: None,
            duplicates: 0,
        }
    }
}

/// One pipeline of a gateway: desired against reported.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PipelineView {
    pub name: String,
    pub deployment: Option<String>,
    pub desired_version: Option<u64>,
    pub reported_version: Option<u64>,
    pub state: Option<String>,
    pub error: Option<String>,
    /// Why the gateway refused the version it was sent.
    pub rejected: Option<String>,
    pub rows_in: u64,
    pub rows_out: u64,
    /// From the last two status reports at least a second apart.
    pub rows_in_per_s: Option<f64>,
    pub rows_out_per_s: Option<f64>,
    pub errors: u64,
    pub restarts: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Online, running the desired version.
    pub in_sync: bool,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeploymentView {
    pub name: String,
    pub selector: String,
    pub priority: i32,
    pub pipelines: BTreeMap<String, u64>,
    /// What `weir rollback` would return to.
    pub rollback_to: Option<BTreeMap<String, u64>>,
    pub targets: Vec<String>,
    pub updated_at_ms: u64,
    pub updated_by: String,
    /// A staged rollout in progress.
    pub rollout: Option<RolloutView>,
    /// Why the last staged rollout was rolled back.
    pub failure: Option<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RolloutView {
    pub canaries: Vec<String>,
    /// What the other gateways run until the canaries have baked.
    pub stable: BTreeMap<String, u64>,
    pub bake_s: u64,
    /// How long every canary has been healthy so far.
    pub baked_s: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VersionView {
    pub pipeline: String,
    pub version: u64,
    pub deployment: String,
    pub sql: String,
    pub created_at_ms: u64,
    pub created_by: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::parse_labels;
    use crate::store::RocksStore;

    const SQL_A: &str = "
        CREATE SOURCE vib (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE)
        WITH (connector = 'simulator', sensors = 1, rate_hz = 10);
        CREATE SINK out WITH (connector = 'null');
        CREATE PIPELINE copy AS INSERT INTO out SELECT sensor, ts, v FROM vib;";

    fn fleet(dir: &std::path::Path) -> Fleet {
        let store = RocksStore::open(&dir.join("store")).expect("store");
        let signer = PlanSigner::load_or_create(&dir.join("key")).expect("key");
        Fleet::load(Arc::new(store), signer, Duration::from_secs(5)).expect("load")
    }

    fn caller(role: Role) -> Caller {
        Caller {
            name: format!("{role}-token"),
            role,
        }
    }

    fn request(name: &str, sql: &str, selector: &str, priority: i32) -> DeployRequest {
        DeployRequest {
            name: Some(name.into()),
            sql: sql.into(),
            file: format!("{name}.sql"),
            selector: selector.into(),
            priority,
            canary: 0,
            bake: Duration::ZERO,
            max_errors: 0,
            fresh: false,
        }
    }

    fn desired(fleet: &Fleet, labels: &[&str]) -> BTreeMap<String, (u64, String)> {
        let labels = parse_labels(labels.iter().copied()).expect("labels");
        fleet.lock().desired_for("someone", &labels)
    }

    #[test]
    fn a_pipeline_claimed_twice_goes_to_the_higher_priority_then_the_newer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = fleet(dir.path());
        let deployer = caller(Role::Deployer);
        fleet
            .deploy(&deployer, request("site-wide", SQL_A, "site=plant1", 5))
            .expect("deploy");
        let other = SQL_A.replace("FROM vib;", "FROM vib WHERE v > 0;");
        fleet
            .deploy(&deployer, request("line3", &other, "line=3", 1))
            .expect("deploy");
        assert_eq!(
            desired(&fleet, &["site=plant1", "line=3"])["copy"],
            (1, "site-wide".to_owned()),
            "priority 5 beats priority 1 although it is older"
        );
        assert_eq!(
            desired(&fleet, &["line=3"])["copy"],
            (2, "line3".to_owned())
        );
        std::thread::sleep(Duration::from_millis(5));
        fleet
            .deploy(&deployer, request("line3", &other, "line=3", 5))
            .expect("redeploy");
        assert_eq!(
            desired(&fleet, &["site=plant1", "line=3"])["copy"],
            (2, "line3".to_owned()),
            "equal priority: the newer deployment wins"
        );
        assert!(desired(&fleet, &["site=plant2"]).is_empty());
    }

    #[test]
    fn redeploying_the_same_sql_makes_no_new_version_and_rollback_resigns_the_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = fleet(dir.path());
        let deployer = caller(Role::Deployer);
        let first = fleet
            .deploy(&deployer, request("d", SQL_A, "", 0))
            .expect("deploy");
        assert_eq!((first.pipelines["copy"], first.changed.len()), (1, 1));
        let again = fleet
            .deploy(&deployer, request("d", SQL_A, "", 0))
            .expect("deploy");
        assert_eq!((again.pipelines["copy"], again.changed.len()), (1, 0));
        let changed = SQL_A.replace("FROM vib;", "FROM vib WHERE v > 0;");
        let second = fleet
            .deploy(&deployer, request("d", &changed, "", 0))
            .expect("deploy");
        assert_eq!(second.pipelines["copy"], 2);
        let back = fleet.rollback(&deployer, "d", false).expect("rollback");
        assert_eq!(
            back.pipelines["copy"], 3,
            "a rollback is a new, higher version"
        );
        let state = fleet.lock();
        let v1 = &state.versions[&("copy".to_owned(), 1)];
        let v3 = &state.versions[&("copy".to_owned(), 3)];
        let plan = |payload: &[u8]| decode_envelope(payload).expect("envelope").plan;
        assert_eq!(plan(&v3.payload), plan(&v1.payload), "v3 carries v1's plan");
        drop(state);
        let error = fleet
            .rollback(&deployer, "d", false)
            .expect_err("no more history");
        assert!(error.to_string().contains("no earlier version"), "{error}");
    }

    #[test]
    fn a_deploy_that_would_lose_window_state_needs_fresh_and_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = fleet(dir.path());
        let deployer = caller(Role::Deployer);
        let windowed = "
            CREATE SOURCE vib (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE,
                               WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
            WITH (connector = 'simulator', sensors = 1, rate_hz = 10);
            CREATE SINK out WITH (connector = 'null');
            CREATE PIPELINE peaks AS INSERT INTO out
            SELECT sensor, window_start, max(v) AS peak
            FROM TUMBLE(vib, ts, INTERVAL '1' SECOND) WHERE v > 0 GROUP BY sensor, window_start;";
        fleet
            .deploy(&deployer, request("d", windowed, "", 0))
            .expect("v1");
        let filtered = fleet
            .deploy(
                &deployer,
                request("d", &windowed.replace("v > 0", "v > 1"), "", 0),
            )
            .expect("a changed filter keeps the windows");
        assert!(filtered.fresh.is_empty());
        let longer = windowed
            .replace("v > 0", "v > 1")
            .replace("'1' SECOND)", "'10' SECOND)");
        let error = fleet
            .deploy(&deployer, request("d", &longer, "", 0))
            .expect_err("a longer window cannot take over 1-second windows");
        let text = error.to_string();
        assert!(matches!(error, CloudError::Conflict(_)), "{text}");
        assert!(
            text.contains("'peaks'") && text.contains("--fresh"),
            "{text}"
        );
        assert_eq!(fleet.versions(Some("peaks")).len(), 2, "nothing was stored");
        let outcome = fleet
            .deploy(
                &deployer,
                DeployRequest {
                    fresh: true,
                    ..request("d", &longer, "", 0)
                },
            )
            .expect("with fresh");
        assert!(outcome.fresh["peaks"].contains("changed"), "{outcome:?}");
        let signed = |version: u64| {
            let state = fleet.lock();
            decode_envelope(&state.versions[&("peaks".to_owned(), version)].payload)
                .expect("envelope")
                .fresh
        };
        assert!(
            signed(3),
            "the gateway is told the operator accepted a fresh start"
        );
        assert!(!signed(2));
        let error = fleet
            .rollback(&deployer, "d", false)
            .expect_err("going back to 1-second windows loses state too");
        assert!(error.to_string().contains("--fresh"), "{error}");
        let back = fleet.rollback(&deployer, "d", true).expect("rollback");
        assert_eq!(back.pipelines["peaks"], 4);
        assert!(back.fresh.contains_key("peaks") && signed(4));
    }

    #[test]
    fn roles_are_enforced_and_bad_sql_names_the_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = fleet(dir.path());
        let error = fleet
            .deploy(&caller(Role::Viewer), request("d", SQL_A, "", 0))
            .expect_err("viewer");
        assert!(matches!(error, CloudError::Forbidden(_)), "{error}");
        let error = fleet
            .add_gateway(&caller(Role::Deployer), "gw", Labels::new())
            .expect_err("deployer");
        assert!(
            error.to_string().contains("needs the admin role"),
            "{error}"
        );
        let bad = SQL_A.replace("SELECT sensor, ts, v", "SELECT sensr, ts, v");
        let Err(CloudError::Compile { rendered, .. }) =
            fleet.deploy(&caller(Role::Deployer), request("d", &bad, "", 0))
        else {
            panic!("bad SQL must not deploy");
        };
        assert!(rendered.starts_with("d.sql:5:"), "{rendered}");
        assert!(fleet.deployments().is_empty(), "nothing was stored");
    }

    #[test]
    fn a_new_token_replaces_the_old_one_tokens_expire_and_revoking_closes_the_door() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = fleet(dir.path());
        let admin = caller(Role::Admin);
        let labels = parse_labels(["site=plant1"]).expect("labels");
        let (gateway, first) = fleet.add_gateway(&admin, "gw", labels).expect("add");
        let second = fleet.new_enrollment(&admin, "gw").expect("new token");
        let refused = fleet
            .enroll(&first, "host")
            .expect_err("the old token is cancelled");
        assert!(matches!(refused, CloudError::Unauthenticated(_)));
        let hash = secret_hash(&second);
        fleet
            .lock()
            .enrollments
            .get_mut(&hash)
            .expect("token")
            .created_at_ms = 0;
        let refused = fleet.enroll(&second, "host").expect_err("expired");
        assert_eq!(refused.to_string(), "the enrollment token is not valid");

        let third = fleet.new_enrollment(&admin, "gw").expect("new token");
        let enrolled = fleet.enroll(&third, "host").expect("enroll");
        let record = fleet
            .authenticate_gateway(&enrolled.credential)
            .expect("credential");
        assert!(fleet.connect(&record, Vec::new()).is_ok());
        fleet.revoke(&admin, "gw").expect("revoke");
        assert!(
            fleet.connect(&record, Vec::new()).is_err(),
            "a stream authenticated before the revocation is refused at its Hello"
        );
        assert!(fleet.authenticate_gateway(&enrolled.credential).is_err());
        assert_eq!(gateway.name, "gw");
    }

    #[test]
    fn a_gateway_moved_to_a_deployment_with_a_lower_version_gets_it_re_signed_above() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = fleet(dir.path());
        let admin = caller(Role::Admin);
        let other = SQL_A.replace("FROM vib;", "FROM vib WHERE v > 0;");
        fleet
            .deploy(&admin, request("site-wide", SQL_A, "site=plant1", 5))
            .expect("v1");
        fleet
            .deploy(&admin, request("line3", &other, "line=3", 1))
            .expect("v2");
        let labels = parse_labels(["line=3"]).expect("labels");
        let (_, token) = fleet.add_gateway(&admin, "gw", labels).expect("add");
        let credential = fleet.enroll(&token, "host").expect("enroll").credential;
        let record = fleet.authenticate_gateway(&credential).expect("gateway");
        let running = vec![RunningPipeline {
            name: "copy".into(),
            version: 2,
        }];
        let (_, _, desired) = fleet.connect(&record, running).expect("connect");
        let sent = |desired: &watch::Receiver<Option<DesiredState>>| -> Vec<(String, u64)> {
            desired
                .borrow()
                .iter()
                .flat_map(|d| d.plans.iter())
                .map(|p| {
                    let envelope = decode_envelope(&p.payload).expect("envelope");
                    (envelope.deployment, envelope.version)
                })
                .collect()
        };
        assert_eq!(sent(&desired), [("line3".to_owned(), 2)]);
        let plant1 = parse_labels(["site=plant1"]).expect("labels");
        fleet.relabel(&admin, "gw", plant1, &[]).expect("relabel");
        assert_eq!(
            sent(&desired),
            [("site-wide".to_owned(), 3)],
            "site-wide wins by priority, re-signed above the v2 the gateway runs"
        );
        assert_eq!(fleet.deployments()[1].pipelines["copy"], 3);
    }

    #[test]
    fn deploying_the_same_sql_again_keeps_a_rollout_baking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet = fleet(dir.path());
        let admin = caller(Role::Admin);
        let labels = parse_labels(["site=plant1"]).expect("labels");
        fleet
            .add_gateway(&admin, "gw1", labels.clone())
            .expect("add");
        fleet.add_gateway(&admin, "gw2", labels).expect("add");
        fleet
            .deploy(&admin, request("d", SQL_A, "site=plant1", 0))
            .expect("v1");
        let changed = SQL_A.replace("FROM vib;", "FROM vib WHERE v > 0;");
        let staged = DeployRequest {
            canary: 1,
            bake: Duration::from_secs(60),
            ..request("d", &changed, "site=plant1", 0)
        };
        let outcome = fleet.deploy(&admin, staged.clone()).expect("v2 staged");
        assert_eq!(outcome.canaries, ["gw1"]);
        let again = fleet.deploy(&admin, staged).expect("the same again");
        assert!(again.changed.is_empty());
        let deployment = &fleet.deployments()[0];
        let rollout = deployment.rollout.as_ref().expect("still baking");
        assert_eq!(rollout.stable["copy"], 1);
        assert_eq!(deployment.pipelines["copy"], 2);
        let others = desired(&fleet, &["site=plant1"]);
        assert_eq!(
            others["copy"].0, 1,
            "the others still run the stable version"
        );
    }

    #[test]
    fn everything_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token;
        {
            let fleet = fleet(dir.path());
            token = fleet
                .bootstrap_admin(|_| Ok(()))
                .expect("bootstrap")
                .expect("first start");
            let admin = fleet.authenticate(&token).expect("admin");
            let labels = parse_labels(["site=plant1"]).expect("labels");
            let (_, enrollment) = fleet.add_gateway(&admin, "gw", labels).expect("add");
            fleet.enroll(&enrollment, "host").expect("enroll");
            fleet
                .deploy(&admin, request("d", SQL_A, "site=plant1", 0))
                .expect("deploy");
        }
        let fleet = fleet(dir.path());
        assert!(
            fleet
                .bootstrap_admin(|_| Ok(()))
                .expect("bootstrap")
                .is_none(),
            "one admin token"
        );
        let admin = fleet.authenticate(&token).expect("the token still works");
        let gateways = fleet.status();
        assert_eq!(gateways.len(), 1);
        assert!(gateways[0].enrolled);
        assert_eq!(gateways[0].pipelines[0].desired_version, Some(1));
        let actions: Vec<String> = fleet
            .audit_log(&admin)
            .expect("audit")
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(
            actions,
            ["token.create", "gateway.add", "gateway.enroll", "deploy"]
        );
    }
}
