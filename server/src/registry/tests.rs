//! Unit tests of the parent module.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::tokens::IssuedToken;
use super::*;
use tether_shared::identity::Identity;
use tether_shared::journal::{Journal, JournalOptions};

const HOUR: Duration = Duration::from_secs(3600);

/// Opens the journal in `dir`, polling while a previous instance's writer thread (which
/// ends shortly after its last handle is dropped) still holds the lock.
fn open(dir: &std::path::Path) -> Registry {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Journal::open(dir, &JournalOptions::default()) {
            Ok((journal, _)) => return Registry::load(journal.handle()).unwrap(),
            Err(JournalError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn request(token: &IssuedToken, name: &str, key: &str) -> EnrollRequest {
    EnrollRequest {
        token: token.token.expose().clone(),
        name: name.to_owned(),
        public_key: key.to_owned(),
        tags: vec!["web".into()],
        role: Role::Agent,
        tls_public_key: None,
        hostnames: Vec::new(),
        proof: String::new(),
        tls_proof: None,
    }
}

fn key() -> String {
    Identity::generate().public_key_b64()
}

#[actix_rt::test]
async fn token_rules() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    for (uses, ttl) in [
        (0, HOUR),
        (MAX_TOKEN_USES + 1, HOUR),
        (1, Duration::ZERO),
        (1, Duration::from_millis(999)),
        (1, MAX_TOKEN_TTL + Duration::from_secs(1)),
    ] {
        let err = reg.create_token(uses, ttl, Role::Agent).await.unwrap_err();
        assert!(matches!(err, RegistryError::Invalid(_)), "{uses} {ttl:?}");
    }
    let t = reg
        .create_token(MAX_TOKEN_USES, MAX_TOKEN_TTL, Role::Relay)
        .await
        .unwrap();
    assert!(t.token.expose().starts_with("tte_") && t.token.expose().len() == 47);
    assert!(!format!("{t:?}").contains(t.token.expose().as_str()));
    // Only the hash is stored.
    let stored = reg.journal.scan_meta(TOKEN_PREFIX).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].0,
        format!("{TOKEN_PREFIX}{}", token_sha256(t.token.expose()))
    );
    assert!(!String::from_utf8_lossy(&stored[0].1).contains(t.token.expose().as_str()));
}

#[actix_rt::test]
async fn uses_are_counted_and_every_refusal_looks_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let now = now_unix_ms();
    let two = reg
        .create_token_at(2, HOUR, Role::Agent, now)
        .await
        .unwrap();
    let a = reg
        .enroll_at(request(&two, "a", &key()), now)
        .await
        .unwrap();
    assert!(a.id.starts_with("a-") && a.id.len() == 18, "{}", a.id);
    assert_eq!(a.tags, vec!["web".to_owned()]);
    reg.enroll_at(request(&two, "b", &key()), now)
        .await
        .unwrap();
    // Spent: deleted from the journal too.
    assert!(reg.journal.scan_meta(TOKEN_PREFIX).unwrap().is_empty());
    let spent = reg.enroll_at(request(&two, "c", &key()), now).await;

    let relay = reg
        .create_token_at(1, HOUR, Role::Relay, now)
        .await
        .unwrap();
    let wrong_role = reg.enroll_at(request(&relay, "d", &key()), now).await;

    let short = reg
        .create_token_at(1, Duration::from_secs(1), Role::Agent, now)
        .await
        .unwrap();
    let expired = reg
        .enroll_at(request(&short, "e", &key()), now + 1_000)
        .await;

    let mut unknown = request(&short, "f", &key());
    unknown.token = "not-a-token".into();
    let unknown = reg.enroll_at(unknown, now).await;
    let mut huge = request(&short, "g", &key());
    huge.token = "x".repeat(100_000);
    let huge = reg.enroll_at(huge, now).await;

    for result in [spent, wrong_role, expired, unknown, huge] {
        let err = result.unwrap_err();
        assert!(matches!(err, RegistryError::InvalidToken), "{err}");
        assert_eq!(err.to_string(), "invalid or expired enrollment token");
    }
    assert_eq!(reg.agents().len(), 2);
    // The relay token still enrolls a relay.
    let mut r = request(&relay, "relay-1", &key());
    r.role = Role::Relay;
    let r = reg.enroll_at(r, now).await.unwrap();
    assert!(r.id.starts_with("r-"));
    assert_eq!(reg.agent(&r.id).map(|a| a.role), Some(Role::Relay));
    assert_eq!(reg.agents().len(), 2);
    assert_eq!(reg.agent_statuses(&nobody()).len(), 2);
}

#[actix_rt::test]
async fn names_tags_and_keys_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let t = reg.create_token(10, HOUR, Role::Agent).await.unwrap();
    let mut bad = vec![
        request(&t, "", &key()),
        request(&t, &"n".repeat(65), &key()),
        request(&t, "has space", &key()),
        request(&t, "<script>", &key()),
        request(&t, "ok", "not base64!"),
        request(&t, "ok", "AAAA"),
    ];
    let mut tags = request(&t, "ok", &key());
    tags.tags = vec!["t".into(); 33];
    bad.push(tags);
    let mut tags = request(&t, "ok", &key());
    tags.tags = vec!["bad/tag".into()];
    bad.push(tags);
    for req in bad {
        let err = reg.enroll(req.clone()).await.unwrap_err();
        assert!(matches!(err, RegistryError::Invalid(_)), "{req:?}: {err}");
    }
    assert!(reg.agents().is_empty());
    let stored = reg.journal.scan_meta(TOKEN_PREFIX).unwrap();
    let left: StoredToken = serde_json::from_slice(&stored[0].1).unwrap();
    assert_eq!(left.uses_left, 10, "invalid requests consume nothing");
}

#[actix_rt::test]
async fn same_name_same_key_is_idempotent_and_other_keys_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let one = reg.create_token(1, HOUR, Role::Agent).await.unwrap();
    let k = key();
    let first = reg.enroll(request(&one, "web-1", &k)).await.unwrap();
    // The token is spent, yet the retry with it gets the same record back.
    let again = reg.enroll(request(&one, "web-1", &k)).await.unwrap();
    assert_eq!(again, first);

    let three = reg.create_token(3, HOUR, Role::Agent).await.unwrap();
    let again = reg.enroll(request(&three, "web-1", &k)).await.unwrap();
    assert_eq!(again, first);
    let err = reg
        .enroll(request(&three, "web-1", &key()))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NameTaken), "{err}");
    let err = reg.enroll(request(&three, "web-2", &k)).await.unwrap_err();
    assert!(matches!(err, RegistryError::KeyTaken), "{err}");
    // Without a valid token, a conflict is not revealed: same answer as any bad token.
    let mut guess = request(&three, "web-1", &key());
    guess.token = "guess".into();
    assert!(matches!(
        reg.enroll(guess).await.unwrap_err(),
        RegistryError::InvalidToken
    ));
    let mut guess = request(&three, "web-1", &k);
    guess.token = "guess".into();
    assert!(matches!(
        reg.enroll(guess).await.unwrap_err(),
        RegistryError::InvalidToken
    ));
    assert_eq!(reg.agents(), vec![first]);
    let stored = reg.journal.scan_meta(TOKEN_PREFIX).unwrap();
    let left: StoredToken = serde_json::from_slice(&stored[0].1).unwrap();
    assert_eq!(left.uses_left, 3, "retries and conflicts consume nothing");
}

#[actix_rt::test]
async fn survives_a_reopen_and_presence_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (token, record) = {
        let reg = open(dir.path());
        let t = reg.create_token(2, HOUR, Role::Agent).await.unwrap();
        let rec = reg.enroll(request(&t, "db-1", &key())).await.unwrap();
        let seen = nobody();
        seen.set_online(&rec.id, "1.2.3", vec!["r-1".into()]);
        let s = &reg.agent_statuses(&seen)[0];
        assert_eq!(s.status, Status::Online);
        assert_eq!(s.version.as_deref(), Some("1.2.3"));
        assert_eq!(s.path, vec!["r-1".to_owned()]);
        seen.set_offline(&rec.id);
        assert_eq!(reg.agent_statuses(&seen)[0].status, Status::Offline);
        (t, rec)
    };
    // The journal's writer thread ends when its last handle is gone.
    let reg = open(dir.path());
    assert_eq!(reg.agent(&record.id), Some(record.clone()));
    // Presence lives in memory only: a restarted server has seen nobody.
    let s = &reg.agent_statuses(&nobody())[0];
    assert_eq!((s.status, s.version.clone()), (Status::Offline, None));
    reg.enroll(request(&token, "db-2", &key())).await.unwrap();
    let err = reg
        .enroll(request(&token, "db-3", &key()))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::InvalidToken), "{err}");
}

#[actix_rt::test]
async fn concurrent_enrollments_never_overspend_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let reg = std::sync::Arc::new(open(dir.path()));
    let t = reg.create_token(3, HOUR, Role::Agent).await.unwrap();
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let reg = reg.clone();
            let req = request(&t, &format!("n{i}"), &key());
            actix_rt::spawn(async move { reg.enroll(req).await.is_ok() })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        ok += usize::from(task.await.unwrap());
    }
    assert_eq!(ok, 3);
    assert_eq!(reg.agents().len(), 3);
}

#[actix_rt::test]
async fn tags_and_properties_change_persist_and_delete_forgets() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let reg = open(dir.path());
        let t = reg.create_token(1, HOUR, Role::Agent).await.unwrap();
        let a = reg.enroll(request(&t, "web-1", &key())).await.unwrap();
        assert!(a.properties.is_empty());
        let props = BTreeMap::from([("rack".to_owned(), "<b2> & \"x\"".to_owned())]);
        let updated = reg
            .update_agent(
                &a.id,
                AgentChanges {
                    tags: Some(vec!["db".into()]),
                    properties: Some(props.clone()),
                    ..AgentChanges::default()
                },
            )
            .await
            .unwrap()
            .unwrap();
        assert_eq!(updated.tags, vec!["db".to_owned()]);
        assert_eq!(updated.properties, props);
        // Invalid changes are refused whole.
        for (tags, properties) in [
            (Some(vec!["bad tag".to_owned()]), None),
            (None, Some(BTreeMap::from([("bad key".into(), "v".into())]))),
            (
                None,
                Some(BTreeMap::from([("k".into(), "line\nbreak".into())])),
            ),
            (
                None,
                Some(BTreeMap::from([(
                    "k".into(),
                    "x".repeat(MAX_PROPERTY_VALUE_LEN + 1),
                )])),
            ),
        ] {
            let err = reg
                .update_agent(
                    &a.id,
                    AgentChanges {
                        tags,
                        properties,
                        ..AgentChanges::default()
                    },
                )
                .await
                .unwrap_err();
            assert!(matches!(err, RegistryError::Invalid(_)), "{err}");
        }
        assert!(reg
            .update_agent("a-nobody", AgentChanges::default())
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            reg.agent_status(&a.id, &nobody()).unwrap().properties,
            props
        );
        a.id
    };
    let reg = open(dir.path());
    let a = reg.agent(&id).unwrap();
    assert_eq!(a.tags, vec!["db".to_owned()]);
    assert_eq!(a.properties["rack"], "<b2> & \"x\"");
    assert_eq!(reg.delete_agent(&id).await.unwrap().unwrap().name, "web-1");
    assert!(reg.agent(&id).is_none());
    assert!(reg.delete_agent(&id).await.unwrap().is_none());
    drop(reg);
    assert!(open(dir.path()).agent(&id).is_none());
}

#[actix_rt::test]
async fn other_tags_need_a_live_token_and_spend_a_use() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let now = now_unix_ms();
    let first = reg
        .create_token_at(1, HOUR, Role::Agent, now)
        .await
        .unwrap();
    let key = key();
    let a = reg
        .enroll_at(request(&first, "a", &key), now)
        .await
        .unwrap();
    assert_eq!(a.tags, ["web"]);
    // The key holder alone (the spent token) cannot move the agent to other work.
    let mut retag = request(&first, "a", &key);
    retag.tags = vec!["db".into()];
    let err = reg.enroll_at(retag.clone(), now).await.unwrap_err();
    assert!(matches!(err, RegistryError::TagsChange), "{err}");
    assert_eq!(reg.agent(&a.id).unwrap().tags, ["web"]);
    // An identical retry still answers the record.
    assert_eq!(
        reg.enroll_at(request(&first, "a", &key), now)
            .await
            .unwrap(),
        a
    );
    // With a live token (install --force --tag db): exactly the tags given, one use spent.
    let second = reg
        .create_token_at(2, HOUR, Role::Agent, now)
        .await
        .unwrap();
    let mut forced = request(&second, "a", &key);
    forced.tags = vec!["db".into()];
    let b = reg.enroll_at(forced, now).await.unwrap();
    assert_eq!(
        (b.id.as_str(), b.tags.as_slice()),
        (a.id.as_str(), &["db".to_owned()][..])
    );
    assert_eq!(reg.tokens()[0].uses_left, 1);
    drop(reg);
    assert_eq!(open(dir.path()).agent(&a.id).unwrap().tags, ["db"]);
}

/// A presence that has seen nobody yet.
fn nobody() -> crate::presence::Presence<()> {
    crate::presence::Presence::default()
}

#[test]
fn agents_older_than_the_server_are_told_to_upgrade() {
    assert!(super::views::older_than_server("0.0.1"));
    assert!(!super::views::older_than_server(env!("CARGO_PKG_VERSION")));
    assert!(!super::views::older_than_server("99.0.0"));
    assert!(
        !super::views::older_than_server("loadgen-0.2.0"),
        "not a release version"
    );
}

#[actix_rt::test]
async fn a_member_looks_up_agents_enrolled_since_its_last_read_at_a_bounded_rate() {
    let dir = tempfile::tempdir().unwrap();
    let active = open(dir.path());
    // Loaded before the enrollments, as a member that has not read the registry since.
    let member = Registry::load(active.journal.clone()).unwrap();
    let t = active.create_token(2, HOUR, Role::Agent).await.unwrap();
    let first = active.enroll(request(&t, "web-1", &key())).await.unwrap();
    let second = active.enroll(request(&t, "web-2", &key())).await.unwrap();
    assert_eq!(member.agent(&first.id), None);
    // Only a node that follows another looks in the journal.
    assert_eq!(member.enrolled_since(&first.id), None);
    member.follow_the_active_node();
    let started = std::time::Instant::now();
    assert_eq!(member.enrolled_since(&first.id), Some(first.clone()));
    assert_eq!(member.agent(&first.id), Some(first), "kept once read");
    // Invented ids spend the second's lookups: the next one is not made.
    for i in 1..MAX_LOOKUPS_PER_S {
        assert_eq!(member.enrolled_since(&format!("a-{i:032x}")), None);
    }
    let capped = member.enrolled_since(&second.id);
    if started.elapsed() < Duration::from_millis(900) {
        assert_eq!(capped, None, "a lookup past the second's budget");
    }
}

#[actix_rt::test]
async fn what_agents_report_of_themselves_is_stored_together_and_only_when_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = {
        let reg = open(dir.path());
        let t = reg.create_token(2, HOUR, Role::Agent).await.unwrap();
        let one = reg.enroll(request(&t, "db-1", &key())).await.unwrap();
        let two = reg.enroll(request(&t, "db-2", &key())).await.unwrap();
        let facts: Facts = [("os".to_owned(), "linux".to_owned())].into();
        let batch = vec![
            (
                one.id.to_string(),
                Reported {
                    facts: Some(facts.clone()),
                    trust_serial: Some(3),
                },
            ),
            (
                two.id.to_string(),
                Reported {
                    facts: None,
                    trust_serial: Some(2),
                },
            ),
            ("a-nobody".to_owned(), Reported::default()),
        ];
        assert_eq!(reg.set_reported(batch.clone()).await.unwrap(), 2);
        // The same again changes nothing, and commits nothing.
        assert_eq!(reg.set_reported(batch).await.unwrap(), 0);
        // A reinstalled agent may hold an older set than before.
        let older = Reported {
            facts: None,
            trust_serial: Some(1),
        };
        let n = reg.set_reported(vec![(two.id.to_string(), older)]);
        assert_eq!(n.await.unwrap(), 1);
        (one, two)
    };
    let reg = open(dir.path());
    assert_eq!(reg.trust_serial(&one.id), 3);
    assert_eq!(reg.trust_serial(&two.id), 1);
    assert_eq!(reg.agent(&one.id).unwrap().facts["os"], "linux");
    assert!(reg.agent(&two.id).unwrap().facts.is_empty());
}
