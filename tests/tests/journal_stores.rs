//! The journal's contract, held by both stores: the embedded sled store and the PostgreSQL
//! store (a database of the test's own, see `tether_tests::postgres`). The same scenarios run
//! through the same `Journal` against each: commits read back, truncation, meta, blobs across
//! batches, a batch's last write winning, state and incarnation surviving a reopen, and (for
//! PostgreSQL) the refusals at open and a database restarted under the journal.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::Path;
use std::sync::Arc;

use tether_shared::journal::{
    Fence, Fenced, Journal, JournalError, JournalHandle, JournalOptions, LogName, NodeSeen, Op,
    PgOptions, PgStore, SledStore, Store,
};
use tether_shared::protocol::Seq;
use tether_tests::postgres::Postgres;

fn log(name: &str) -> LogName {
    LogName::new(name).unwrap()
}

fn pg_options(url: String) -> PgOptions {
    PgOptions {
        url,
        ca_file: None,
        pool_size: 2,
    }
}

/// Opens a journal over `store`; its handle and whether it was created.
fn open(store: Arc<dyn Store>, dir: &Path) -> (JournalHandle, bool, String) {
    let (journal, recovered) =
        Journal::with_store(store, dir, &JournalOptions::default(), None).unwrap();
    (
        journal.handle(),
        recovered.created,
        recovered.incarnation.clone(),
    )
}

fn appends(l: &LogName, seqs: std::ops::RangeInclusive<u64>) -> Vec<Op> {
    seqs.map(|i| Op::Append {
        log: l.clone(),
        seq: Seq(i),
        payload: vec![i as u8; 10],
    })
    .collect()
}

fn seqs(j: &JournalHandle, l: &LogName, after: u64, limit: usize) -> Vec<u64> {
    j.read_log(l, Seq(after), limit)
        .unwrap()
        .iter()
        .map(|r| r.seq.0)
        .collect()
}

/// Every scenario against one store; `reopen` gives a fresh store over the same data.
async fn contract(reopen: &dyn Fn() -> Arc<dyn Store>, dir: &Path) {
    let (j, created, incarnation) = open(reopen(), dir);
    assert!(created, "a new store is a new journal");

    // Records: read back in order, by range and limit; truncation; a repeated append replaces.
    let l = log("out/events");
    j.commit(appends(&l, 1..=5)).await.unwrap();
    j.commit(vec![Op::TruncateThrough {
        log: l.clone(),
        upto: Seq(2),
    }])
    .await
    .unwrap();
    assert_eq!(seqs(&j, &l, 0, 100), [3, 4, 5]);
    assert_eq!(seqs(&j, &l, 3, 1), [4]);
    j.commit(appends(&l, 5..=5)).await.unwrap();
    assert_eq!(
        seqs(&j, &l, 0, 100),
        [3, 4, 5],
        "appends are idempotent by seq"
    );
    // In one batch, a truncation removes what the batch appended before it (and what was
    // there), not what it appends after it; several truncations of several logs at once.
    let t = log("out/truncated");
    j.commit(appends(&t, 1..=3)).await.unwrap();
    let mut batch = appends(&t, 4..=6);
    batch.push(Op::TruncateThrough {
        log: t.clone(),
        upto: Seq(5),
    });
    batch.extend(appends(&t, 5..=5));
    batch.push(Op::TruncateThrough {
        log: l.clone(),
        upto: Seq(3),
    });
    j.commit(batch).await.unwrap();
    assert_eq!(seqs(&j, &t, 0, 100), [5, 6]);
    assert_eq!(seqs(&j, &l, 0, 100), [4, 5]);
    j.commit(vec![
        Op::TruncateThrough {
            log: t.clone(),
            upto: Seq::MAX_VALID,
        },
        Op::TruncateThrough {
            log: l.clone(),
            upto: Seq(2),
        },
    ])
    .await
    .unwrap();
    assert!(seqs(&j, &t, 0, 100).is_empty());
    assert_eq!(seqs(&j, &l, 0, 100), [4, 5]);
    j.commit(appends(&l, 3..=3)).await.unwrap();
    assert_eq!(seqs(&j, &l, 0, 100), [3, 4, 5]);
    // Another log with a name that extends this one's is not part of it.
    let other = log("out/events2");
    j.commit(appends(&other, 1..=2)).await.unwrap();
    assert_eq!(seqs(&j, &l, 0, 100), [3, 4, 5]);
    assert_eq!(seqs(&j, &other, 0, 100), [1, 2]);

    // Meta, and a batch's last write to a key winning.
    j.commit(vec![
        Op::PutMeta {
            key: "k/a".into(),
            value: b"1".to_vec(),
        },
        Op::PutMeta {
            key: "k/b".into(),
            value: b"2".to_vec(),
        },
        Op::DeleteMeta { key: "k/b".into() },
        Op::PutMeta {
            key: "k/c".into(),
            value: b"x".to_vec(),
        },
        Op::PutMeta {
            key: "k/c".into(),
            value: b"3".to_vec(),
        },
    ])
    .await
    .unwrap();
    assert_eq!(j.get_meta("k/a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(j.get_meta("k/b").unwrap(), None);
    let scanned: Vec<(String, Vec<u8>)> = j.scan_meta("k/").unwrap();
    assert_eq!(
        scanned,
        [("k/a".into(), b"1".to_vec()), ("k/c".into(), b"3".to_vec())]
    );
    // Pages: bounded by rows and by the bytes of their values; the first row always comes,
    // whatever its size, and a page goes on from where it is told.
    j.commit(
        (0..6u8)
            .map(|i| Op::PutMeta {
                key: format!("p/{i}"),
                value: vec![i; 100 * (usize::from(i) + 1)],
            })
            .collect(),
    )
    .await
    .unwrap();
    let page = |from: &str, rows: usize, bytes: usize| -> Vec<String> {
        j.scan_meta_from(from, "p/", rows, bytes)
            .unwrap()
            .entries
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    };
    let full = |from: &str, rows: usize, bytes: usize| -> bool {
        j.scan_meta_from(from, "p/", rows, bytes).unwrap().full
    };
    assert_eq!(page("p/", 100, usize::MAX).len(), 6);
    assert_eq!(page("p/", 2, usize::MAX), ["p/0", "p/1"]);
    // (Each value as stored has a 5-byte header.) 105 + 205 < 311: a third row is read, and
    // it is the last.
    assert_eq!(page("p/", 100, 311), ["p/0", "p/1", "p/2"]);
    assert_eq!(page("p/", 100, 310), ["p/0", "p/1"]);
    assert_eq!(page("p/3", 100, 1), ["p/3"]);
    assert_eq!(
        page("p/3", 100, 0),
        ["p/3"],
        "the first row, whatever the budget"
    );
    // Full: bounded by rows or by bytes as stored (each value's header counted), so more may
    // follow; not full: it read to the end.
    assert!(full("p/", 2, usize::MAX));
    assert!(full("p/", 100, 311));
    assert!(full("p/", 100, 310), "105 + 205 stored bytes reach 310");
    assert!(!full("p/", 100, 1_000_000));
    assert!(!full("p/5", 100, 606), "the last row alone, within budget");
    assert_eq!(page("p/4", 100, 505), ["p/4"]);
    assert_eq!(page("p/4", 100, 506), ["p/4", "p/5"]);
    assert!(page("p/6", 100, 1).is_empty());
    // Several prefixes in one read: in key order, bounded per prefix by rows, over all of them
    // by bytes (each value stored with a 5-byte header: 15 bytes here).
    j.commit(
        ["q/a/1", "q/a/2", "q/a/3", "q/ab/1", "q/b/1", "q/c/1"]
            .iter()
            .map(|k| Op::PutMeta {
                key: (*k).to_owned(),
                value: vec![7; 10],
            })
            .collect(),
    )
    .await
    .unwrap();
    // Blocking, and not: the same page.
    let under = |prefixes: &[&str], rows: usize, bytes: usize| {
        let prefixes: Vec<String> = prefixes.iter().map(|p| (*p).to_owned()).collect();
        let page = j.scan_meta_prefixes(&prefixes, rows, bytes).unwrap();
        let later = j.scan_meta_prefixes_async(&prefixes, rows, bytes);
        async move {
            assert_eq!(later.await.unwrap(), page);
            (
                page.entries
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect::<Vec<String>>(),
                page.full,
            )
        }
    };
    assert_eq!(
        under(&["q/c/", "q/a/"], 10, usize::MAX).await,
        (
            vec![
                "q/a/1".into(),
                "q/a/2".into(),
                "q/a/3".into(),
                "q/c/1".into()
            ],
            false
        ),
        "q/ab/ is not under q/a/"
    );
    assert_eq!(
        under(&["q/c/", "q/a/"], 2, usize::MAX).await,
        (vec!["q/a/1".into(), "q/a/2".into(), "q/c/1".into()], true)
    );
    assert_eq!(
        under(&["q/a/", "q/b/"], 10, 31).await,
        (vec!["q/a/1".into(), "q/a/2".into(), "q/a/3".into()], true)
    );
    assert_eq!(
        under(&["q/b/"], 10, 0).await.0,
        ["q/b/1"],
        "the first row, whatever the budget"
    );
    assert_eq!(under(&["q/none/"], 10, 100).await, (Vec::new(), false));
    assert_eq!(under(&[], 10, 100).await, (Vec::new(), false));

    // Blobs: appended across batches and within one, read by range, never past the
    // committed length, gone on delete, and written again from zero.
    let b = log("joblog/x/0");
    j.commit(vec![Op::AppendBlob {
        name: b.clone(),
        bytes: b"hello ".to_vec(),
    }])
    .await
    .unwrap();
    j.commit(vec![
        Op::AppendBlob {
            name: b.clone(),
            bytes: b"wide ".to_vec(),
        },
        Op::AppendBlob {
            name: b.clone(),
            bytes: b"world".to_vec(),
        },
    ])
    .await
    .unwrap();
    assert_eq!(j.read_blob(&b, 0, 1000).unwrap(), b"hello wide world");
    assert_eq!(j.read_blob(&b, 3, 6).unwrap(), b"lo wid");
    assert_eq!(j.read_blob(&b, 16, 10).unwrap(), b"");
    assert_eq!(j.read_blob(&log("joblog/none/0"), 0, 10).unwrap(), b"");
    j.commit(vec![
        Op::DeleteBlob { name: b.clone() },
        Op::AppendBlob {
            name: b.clone(),
            bytes: b"again".to_vec(),
        },
    ])
    .await
    .unwrap();
    assert_eq!(j.read_blob(&b, 0, 1000).unwrap(), b"again");
    j.commit(vec![Op::DeleteBlob { name: b.clone() }])
        .await
        .unwrap();
    assert_eq!(j.read_blob(&b, 0, 1000).unwrap(), b"");

    // A record too large is refused before anything is written.
    let huge = Op::Append {
        log: l.clone(),
        seq: Seq(9),
        payload: vec![0; tether_shared::journal::MAX_RECORD_BYTES + 1],
    };
    assert!(matches!(
        j.commit(vec![huge]).await,
        Err(JournalError::TooLarge { .. })
    ));
    assert_eq!(seqs(&j, &l, 0, 100), [3, 4, 5]);
    let health = j.observe();
    assert!(health.batches >= 1 && health.commits >= 7, "{health:?}");
    drop(j);

    // Everything survives a reopen, the incarnation with it; recovery validated it all.
    let (j, created, again) = open(reopen(), dir);
    assert!(!created);
    assert_eq!(again, incarnation);
    assert_eq!(seqs(&j, &l, 0, 100), [3, 4, 5]);
    assert_eq!(j.get_meta("k/c").unwrap().as_deref(), Some(&b"3"[..]));
    assert_eq!(j.read_blob(&b, 0, 1000).unwrap(), b"");
}

#[actix::test]
async fn the_sled_store_keeps_the_journals_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal");
    // The last journal's writer thread lets go of sled's lock once it sees its handles gone.
    let reopen = || -> Arc<dyn Store> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match SledStore::open(&path, &Default::default()) {
                Ok(store) => return Arc::new(store),
                Err(JournalError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    contract(&reopen, &path).await;
}

#[actix::test]
async fn the_postgres_store_keeps_the_journals_contract() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.url();
    let reopen =
        || -> Arc<dyn Store> { Arc::new(PgStore::open(&pg_options(url.clone())).unwrap()) };
    contract(&reopen, Path::new("postgres")).await;
    // The schema is versioned.
    assert_eq!(
        pg.psql("SELECT version FROM tether_schema"),
        tether_shared::journal::pg::MIGRATIONS.len().to_string()
    );
}

fn refusal(opts: PgOptions) -> String {
    match PgStore::open(&opts) {
        Ok(_) => panic!("opened"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_database_that_cannot_keep_its_word_or_is_not_ours_is_refused_at_open() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let wrong = refusal(pg_options(pg.url_with_password("not-it")));
    assert!(wrong.contains("password authentication failed"), "{wrong}");
    let nowhere = refusal(pg_options("host=/nonexistent user=postgres".into()));
    assert!(nowhere.contains("cannot connect"), "{nowhere}");
    let garbage = refusal(pg_options("postgres://[::1".into()));
    assert!(garbage.contains("invalid storage.url"), "{garbage}");

    // A schema from a newer server: refused, and left as it was.
    drop(PgStore::open(&pg_options(pg.url())).unwrap());
    pg.psql("UPDATE tether_schema SET version = 99");
    let newer = refusal(pg_options(pg.url()));
    assert!(newer.contains("schema is version 99"), "{newer}");
    assert_eq!(pg.psql("SELECT version FROM tether_schema"), "99");

    // fsync off: acknowledged commits could be lost in a crash.
    let Some(unsafe_pg) = Postgres::start_with(&["fsync=off"]) else {
        return;
    };
    let fsync = refusal(pg_options(unsafe_pg.url()));
    assert!(fsync.contains("fsync = off"), "{fsync}");
    assert_eq!(
        unsafe_pg.psql("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'tether%'"),
        "0",
        "nothing created in a refused database"
    );
}

#[actix::test]
async fn the_postgres_store_reconnects_after_the_database_restarts() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let store: Arc<dyn Store> = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    let (j, _, _) = open(store, Path::new("postgres"));
    let l = log("out/events");
    j.commit(appends(&l, 1..=3)).await.unwrap();
    pg.stop_immediately();
    pg.restart();
    // Reads and writes go on over new connections; what was acknowledged is there.
    assert_eq!(seqs(&j, &l, 0, 100), [1, 2, 3]);
    assert_eq!(j.get_meta("none").unwrap(), None);
    j.commit(appends(&l, 4..=4)).await.unwrap();
    assert_eq!(seqs(&j, &l, 0, 100), [1, 2, 3, 4]);
}

/// A batch of every kind of write: records `round`1 to `round`3 (and, if `rewrite`, the last
/// one of the round before written again), a truncation through `round`2 minus 10, meta and a
/// blob appended to.
fn mixed_batch(l: &LogName, b: &LogName, round: u64, rewrite: bool) -> Vec<Op> {
    let base = round * 10;
    let mut ops = appends(l, base + 1..=base + 3);
    if rewrite {
        ops.extend(appends(l, base - 7..=base - 7));
    }
    ops.extend([
        Op::TruncateThrough {
            log: l.clone(),
            upto: Seq(base - 8),
        },
        Op::PutMeta {
            key: "round".into(),
            value: round.to_string().into_bytes(),
        },
        Op::AppendBlob {
            name: b.clone(),
            bytes: format!("[{round}]").into_bytes(),
        },
    ]);
    ops
}

#[actix::test]
async fn an_ambiguous_commit_is_settled_by_trying_the_same_batch_again() {
    use tether_tests::pg_proxy::{Cut, PgProxy};
    let Some(pg) = Postgres::start() else {
        return;
    };
    let proxy = PgProxy::start(pg.socket_dir());
    let store = Arc::new(PgStore::open(&pg_options(proxy.url(&pg.url()))).unwrap());
    let (j, _, _) = open(store.clone(), Path::new("postgres"));
    let (l, b) = (log("out/events"), log("joblog/d/0"));
    j.commit(appends(&l, 1..=10)).await.unwrap();
    // Cut before the database sees COMMIT (nothing committed), then after it answered (all
    // committed, the answer lost), then not at all: every batch is answered once it is
    // durable, and written once.
    let mut blob = String::new();
    for (round, cut, rewrite) in [
        (1, Cut::BeforeCommit, false),
        (2, Cut::AfterCommit, false),
        (3, Cut::Nothing, true),
        (4, Cut::AfterCommit, true),
    ] {
        let cuts = proxy.cuts();
        proxy.arm(cut);
        j.commit(mixed_batch(&l, &b, round, rewrite)).await.unwrap();
        let expected_cuts = cuts + u64::from(cut != Cut::Nothing);
        assert_eq!(
            proxy.cuts(),
            expected_cuts,
            "round {round}: the cut happened"
        );
        blob.push_str(&format!("[{round}]"));
        assert_eq!(j.observe().waiting, None, "round {round}");
        assert_eq!(j.observe().poisoned, None, "round {round}");
    }
    assert_eq!(
        proxy.swallowed(),
        2,
        "the database answered both cut COMMITs"
    );
    // What the database holds, read past the proxy by a store of its own: each batch once.
    let direct: Arc<dyn Store> = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    let (d, _, _) = open(direct, Path::new("postgres"));
    assert_eq!(seqs(&d, &l, 0, 100), [33, 41, 42, 43]);
    assert_eq!(d.get_meta("round").unwrap().as_deref(), Some(&b"4"[..]));
    assert_eq!(d.read_blob(&b, 0, 1000).unwrap(), blob.as_bytes());
    for r in d.read_log(&l, Seq(0), 100).unwrap() {
        assert_eq!(r.payload, vec![r.seq.0 as u8; 10], "seq {}", r.seq.0);
    }
}

/// Each batch is two flights, its writes and its `COMMIT` sent together: a write the database
/// refuses must take the whole batch with it (the `COMMIT` after it rolls back), and leave the
/// connection ready for the next batch.
#[actix::test]
async fn a_write_the_database_refuses_takes_its_whole_batch_and_the_next_batch_commits() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let store = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    let (j, _, _) = open(store.clone(), Path::new("postgres"));
    let l = log("out/events");
    j.commit(appends(&l, 1..=3)).await.unwrap();
    // (Through the store itself: a journal whose store failed a write takes no more.)
    // The database refuses record 6 of the log: records are the batch's last write, after
    // the truncation and the meta keys, which it must take back with it.
    let refused_key = hex::encode(tether_shared::journal::record::record_key(&l, Seq(6)));
    pg.psql(&format!(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           IF NEW.key = decode('{refused_key}', 'hex') THEN RAISE EXCEPTION 'refused by the test'; END IF;
           RETURN NEW; END $$;
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON tether_journal
           FOR EACH ROW EXECUTE FUNCTION refuse();"
    ));
    let mut refused = appends(&l, 4..=6);
    refused.extend([
        Op::TruncateThrough {
            log: l.clone(),
            upto: Seq(2),
        },
        Op::PutMeta {
            key: "kept-only-with-its-batch".into(),
            value: b"x".to_vec(),
        },
    ]);
    let err = store.apply(&refused).unwrap_err().to_string();
    assert!(err.contains("refused by the test"), "{err}");
    assert!(
        !err.contains("outcome is unknown"),
        "answered, so known: {err}"
    );
    assert_eq!(seqs(&j, &l, 0, 100), [1, 2, 3], "nothing of the batch");
    assert_eq!(j.get_meta("kept-only-with-its-batch").unwrap(), None);
    // The same connection takes the next batch.
    store.apply(&appends(&l, 4..=5)).unwrap();
    assert_eq!(seqs(&j, &l, 0, 100), [1, 2, 3, 4, 5]);
    assert_eq!(j.get_meta("kept-only-with-its-batch").unwrap(), None);
    assert_eq!(store.waiting(), None);
    assert_eq!(idle_in_transaction(&pg), "0", "no transaction left open");
}

/// How many sessions hold a transaction open, waiting for their client.
fn idle_in_transaction(pg: &Postgres) -> String {
    pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'")
}

#[actix::test]
async fn a_node_that_lost_the_lease_can_never_commit_again() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let ttl = std::time::Duration::from_millis(1500);
    let a = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    let b = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    let lease_a = a.acquire_lease("node-a", ttl).unwrap().unwrap();
    assert_eq!(lease_a.epoch, 1);
    let held = b.acquire_lease("node-b", ttl).unwrap().unwrap_err();
    assert_eq!((held.holder.as_str(), held.epoch), ("node-a", 1));
    assert!(held.expires_in_ms > 0, "{held:?}");

    let (ja, _, _) = open(a.clone(), Path::new("postgres"));
    let l = log("out/events");
    ja.commit(appends(&l, 1..=2)).await.unwrap();
    a.renew_lease().unwrap();

    // Node a stops renewing (as if frozen); once its lease expires, b takes over.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let lease_b = loop {
        match b.acquire_lease("node-b", ttl).unwrap() {
            Ok(lease) => break lease,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(h) => panic!("no takeover: {h:?}"),
        }
    };
    assert_eq!(lease_b.epoch, 2, "a takeover raises the epoch");

    // a wakes up: its batch is refused inside its own transaction, and nothing of it is kept.
    let refused = ja.commit(appends(&l, 3..=3)).await.unwrap_err();
    assert!(
        refused.to_string().contains("no longer holds the lease"),
        "{refused}"
    );
    assert_eq!(
        idle_in_transaction(&pg),
        "0",
        "the refused try's transaction was ended (it holds the lease's row)"
    );
    assert!(a.renew_lease().is_err(), "a lost lease is not renewed");
    assert!(
        ja.commit(appends(&l, 4..=4)).await.is_err(),
        "nothing more is committed"
    );
    let (jb, _, _) = open(b.clone(), Path::new("postgres"));
    assert_eq!(seqs(&jb, &l, 0, 100), [1, 2], "a's late batch is not there");
    jb.commit(appends(&l, 3..=3)).await.unwrap();
    b.renew_lease().unwrap();
    // a cannot take it back while b holds it.
    let held = a.acquire_lease("node-a", ttl).unwrap().unwrap_err();
    assert_eq!((held.holder.as_str(), held.epoch), ("node-b", 2));
    assert_eq!(
        a.lease_holder().unwrap().map(|h| h.holder),
        Some("node-b".to_owned())
    );
}

#[actix::test]
async fn the_lease_is_handed_to_a_standby_at_once_and_the_giver_commits_nothing_more() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    // A lease far longer than the test: any takeover seen here is the hand-over's.
    let ttl = std::time::Duration::from_secs(600);
    let a = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    let b = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    let lease_a = a.acquire_lease("node-a", ttl).unwrap().unwrap();
    let seen = |node: &str, role: &str, sessions: i64| NodeSeen {
        node: node.into(),
        role: role.into(),
        version: "1".into(),
        sessions,
        url: format!("https://{node}:8443"),
        seen_ms_ago: 0,
    };
    a.note_node(&seen("node-a", "active", 3)).unwrap();
    let (ja, _, _) = open(a.clone(), Path::new("postgres"));
    let l = log("out/events");
    ja.commit(appends(&l, 1..=1)).await.unwrap();

    // No standby heard from: nothing to hand to, the lease stays and a goes on committing.
    assert_eq!(a.hand_over_lease().unwrap(), None);
    ja.commit(appends(&l, 2..=2)).await.unwrap();
    a.renew_lease().unwrap();

    // b waits as a standby and notes itself so; a hands the lease to it.
    assert!(b.acquire_lease("node-b", ttl).unwrap().is_err());
    b.note_node(&seen("node-b", "standby", 0)).unwrap();
    let listed = a.nodes().unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|n| (n.node.as_str(), n.sessions, n.url.as_str()))
            .collect::<Vec<_>>(),
        [
            ("node-a", 3, "https://node-a:8443"),
            ("node-b", 0, "https://node-b:8443")
        ]
    );
    let heir = a.hand_over_lease().unwrap().expect("an heir");
    assert_eq!(
        (heir.holder.as_str(), heir.epoch),
        ("node-b", lease_a.epoch + 1)
    );
    // a commits nothing more, renews nothing, and cannot take the lease back.
    let refused = ja.commit(appends(&l, 3..=3)).await.unwrap_err();
    assert!(
        refused.to_string().contains("no longer holds the lease"),
        "{refused}"
    );
    assert_eq!(
        idle_in_transaction(&pg),
        "0",
        "the refused try's transaction was ended (it holds the lease's row)"
    );
    assert!(a.renew_lease().is_err());
    assert!(a.acquire_lease("node-a", ttl).unwrap().is_err());
    assert!(
        a.hand_over_lease().is_err(),
        "a lease no longer held is not handed over"
    );
    // b takes it at its next look, long before the lease could have run out.
    let lease_b = b
        .acquire_lease("node-b", ttl)
        .unwrap()
        .expect("b takes over at once");
    assert!(lease_b.epoch > heir.epoch, "{lease_b:?}");
    let (jb, _, _) = open(b.clone(), Path::new("postgres"));
    assert_eq!(seqs(&jb, &l, 0, 100), [1, 2], "a's late batch is not there");
    jb.commit(appends(&l, 3..=3)).await.unwrap();
}

fn put(key: String) -> Op {
    Op::PutMeta {
        key,
        value: b"x".to_vec(),
    }
}

fn fenced(range: std::ops::Range<usize>, fence: &Fence) -> Fenced {
    Fenced {
        range,
        fence: fence.clone(),
    }
}

#[actix::test]
async fn a_commit_under_a_claim_taken_since_writes_nothing_and_the_rest_of_its_batch_commits() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let a = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    let b = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    let first = a.claim("agent-1", "node-a").unwrap();
    let other = a.claim("agent-2", "node-a").unwrap();
    assert_eq!((first.epoch, other.epoch), (1, 1));
    let newer = b.claim("agent-1", "node-b").unwrap();
    assert_eq!(newer.epoch, 2, "a newer claim raises the epoch");
    assert_eq!(
        a.claim_holder("agent-1").unwrap(),
        Some(("node-b".to_owned(), 2))
    );
    let never = Fence::of("agent-3", 1);
    let (ja, _, _) = open(a.clone(), Path::new("postgres"));

    // One batch of four requests: under the claim taken since, under one still held, under
    // one never made, and under none.
    let ops: Vec<Op> = ["stale", "held", "never", "plain"]
        .iter()
        .map(|k| put(format!("claims/{k}")))
        .collect();
    let out = a
        .apply_fenced(
            &ops,
            &[
                fenced(0..1, &first),
                fenced(1..2, &other),
                fenced(2..3, &never),
            ],
        )
        .unwrap();
    assert_eq!(out, [true, false, true]);
    let keys = |j: &JournalHandle| -> Vec<String> {
        j.scan_meta("claims/")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    };
    assert_eq!(keys(&ja), ["claims/held", "claims/plain"]);

    // Through the journal: the stale commit fails as fenced and writes nothing; b's commits
    // under the newer claim go through.
    let refused = ja
        .commit_under(vec![put("claims/late".into())], Some(first.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, JournalError::Fenced { claim, epoch } if claim == "agent-1" && *epoch == 1),
        "{refused}"
    );
    let (jb, _, _) = open(b.clone(), Path::new("postgres"));
    jb.commit_under(vec![put("claims/newer".into())], Some(newer))
        .await
        .unwrap();
    assert_eq!(
        keys(&jb),
        ["claims/held", "claims/newer", "claims/plain"],
        "the fenced commit left nothing"
    );

    // A node that holds a claim at the epoch it names keeps it (a new session of the same agent
    // on the same node); one that lost it raises it again.
    let kept = a.claiming("agent-2", "node-a", Some(1)).await.unwrap();
    assert_eq!(kept.epoch, 1);
    let back = a.claiming("agent-1", "node-a", Some(1)).await.unwrap();
    assert_eq!(back.epoch, 3);
    assert_eq!(
        b.claim_holder("agent-1").unwrap(),
        Some(("node-a".to_owned(), 3))
    );
    // A storm of claims asked at once, one of them twice: all answered, in few statements.
    let storm: Vec<_> = (0..3000)
        .map(|i| a.claiming(&format!("storm-{}", i.min(2998)), "node-a", None))
        .collect();
    let fences = futures_util::future::join_all(storm).await;
    let epochs: Vec<u64> = fences.into_iter().map(|f| f.unwrap().epoch).collect();
    assert!(epochs[..2999].iter().all(|e| *e == 1), "one claim each");
    assert_eq!(epochs[2999], 2, "the claim asked twice was raised twice");
}

#[actix::test]
async fn a_fenced_commit_whose_answer_was_lost_is_settled_by_asking_the_database() {
    use tether_tests::pg_proxy::{Cut, PgProxy};
    let Some(pg) = Postgres::start() else {
        return;
    };
    let proxy = PgProxy::start(pg.socket_dir());
    let store = Arc::new(PgStore::open(&pg_options(proxy.url(&pg.url()))).unwrap());
    let direct = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    let (j, _, _) = open(store.clone(), Path::new("postgres"));
    // The COMMIT of a fenced batch gets no answer, and before the batch is tried again the
    // claim moves on: the database is asked how the first try ended. Committed (the answer was
    // lost): it was written while the claim held, and is answered so. Not committed: it is not
    // written now, and the other commits of its batch are.
    for (cut, written) in [(Cut::AfterCommit, true), (Cut::BeforeCommit, false)] {
        let agent = format!("agent-{cut:?}");
        let fence = direct.claim(&agent, "node-a").unwrap();
        let cuts = proxy.cuts();
        proxy.hold(true);
        proxy.arm(cut);
        let fenced = j.commit_under(vec![put(format!("lost/{agent}"))], Some(fence));
        let plain = j.commit(vec![put(format!("plain/{agent}"))]);
        while proxy.cuts() == cuts {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(direct.claim(&agent, "node-b").unwrap().epoch, 2);
        proxy.hold(false);
        let settled = tokio::time::timeout(std::time::Duration::from_secs(30), fenced).await;
        match (written, settled.expect("settled")) {
            (true, Ok(_)) | (false, Err(JournalError::Fenced { .. })) => {}
            (_, other) => panic!("{cut:?}: {other:?}"),
        }
        plain.await.unwrap();
        let (d, _, _) = open(direct.clone(), Path::new("postgres"));
        let there = |k: &str| d.get_meta(k).unwrap().is_some();
        assert_eq!(there(&format!("lost/{agent}")), written, "{cut:?}");
        assert!(there(&format!("plain/{agent}")), "{cut:?}");
        // Settled by asking: the try that asked wrote nothing, and ended its transaction.
        assert_eq!(idle_in_transaction(&pg), "0", "{cut:?}");
    }
}

#[test]
fn an_agent_claimed_by_two_nodes_in_turn_never_commits_under_an_older_claim() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let stores: Vec<Arc<PgStore>> = (0..2)
        .map(|_| Arc::new(PgStore::open(&pg_options(pg.url())).unwrap()))
        .collect();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let key_epoch = |k: &str| -> u64 { k.split('/').nth(1).unwrap().parse().unwrap() };
    let nodes: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(i, store)| {
            let store = store.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let (journal, _, _) = rt.block_on(async {
                    let (j, _) = Journal::with_store(
                        store.clone(),
                        Path::new("postgres"),
                        &JournalOptions::default(),
                        None,
                    )
                    .unwrap();
                    (j.handle(), (), ())
                });
                let node = format!("node-{i}");
                // (epoch claimed, rows under an older epoch right after the claim)
                let mut claims = Vec::new();
                let (mut written, mut refused, mut plain) = (0u32, 0u32, 0u32);
                let mut n = 0u32;
                while std::time::Instant::now() < until {
                    let fence = store.claim("agent-flap", &node).unwrap();
                    let below = journal
                        .scan_meta("flap/")
                        .unwrap()
                        .iter()
                        .filter(|(k, _)| key_epoch(k) < fence.epoch)
                        .count();
                    claims.push((fence.epoch, below));
                    // Three commits under the claim and one under none, queued at once so that
                    // they share batches with each other and race the other node's claims.
                    let mut commits = Vec::new();
                    for _ in 0..3 {
                        n += 1;
                        let key = format!("flap/{:020}/{node}/{n}", fence.epoch);
                        commits.push((
                            true,
                            journal.commit_under(vec![put(key)], Some(fence.clone())),
                        ));
                    }
                    n += 1;
                    commits.push((
                        false,
                        journal.commit_under(vec![put(format!("plain/{node}/{n}"))], None),
                    ));
                    for (under_claim, commit) in commits {
                        match (under_claim, rt.block_on(commit)) {
                            (true, Ok(_)) => written += 1,
                            (true, Err(JournalError::Fenced { .. })) => refused += 1,
                            (false, Ok(_)) => plain += 1,
                            (_, Err(e)) => panic!("{e}"),
                        }
                    }
                }
                (journal, claims, written, refused, plain)
            })
        })
        .collect();
    let results: Vec<_> = nodes.into_iter().map(|t| t.join().unwrap()).collect();
    let journal = &results[0].0;
    let rows = journal.scan_meta("flap/").unwrap();
    let mut claimed = 0;
    for (_, claims, written, _, plain) in &results {
        assert!(*written > 0 && *plain > 0, "every node got commits through");
        claimed += claims.len();
        for (epoch, below) in claims {
            let now = rows.iter().filter(|(k, _)| key_epoch(k) < *epoch).count();
            assert_eq!(
                now, *below,
                "a commit under an epoch older than {epoch} landed after it was claimed"
            );
        }
    }
    let refused: u32 = results.iter().map(|r| r.3).sum();
    assert!(
        refused > 0,
        "some commits raced a newer claim ({claimed} claims)"
    );
    let plain: u32 = results.iter().map(|r| r.4).sum();
    assert_eq!(journal.scan_meta("plain/").unwrap().len(), plain as usize);
    let written: u32 = results.iter().map(|r| r.2).sum();
    assert_eq!(
        rows.len(),
        written as usize,
        "every commit answered as written is there"
    );
}

/// A data directory `tether-server init` filled (for its CA and a certificate for localhost).
fn initialised(dir: &Path) -> std::path::PathBuf {
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let data = dir.join("server");
    let out = tether_tests::run(
        "tether-server",
        &etc,
        ["init", "--data", data.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", tether_tests::stderr(&out));
    data
}

#[actix::test]
async fn tls_to_the_database_is_verified_against_the_configured_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = initialised(&tmp.path().join("ours"));
    let theirs = initialised(&tmp.path().join("theirs"));
    let Some(pg) = Postgres::start_tls(&ours.join("server.pem"), &ours.join("server.key")) else {
        return;
    };
    let tls = |ca: &Path| PgOptions {
        url: pg.tcp_url("localhost"),
        ca_file: Some(ca.to_owned()),
        pool_size: 1,
    };
    // The database's certificate is signed by the configured CA: connected, over TLS.
    let store: Arc<dyn Store> = Arc::new(PgStore::open(&tls(&ours.join("ca.pem"))).unwrap());
    let (j, _, _) = open(store, Path::new("postgres"));
    let l = log("out/events");
    j.commit(appends(&l, 1..=2)).await.unwrap();
    assert_eq!(seqs(&j, &l, 0, 10), [1, 2]);
    let encrypted: u64 = pg
        .psql("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.application_name = 'tether-server'")
        .parse()
        .unwrap();
    assert!(
        encrypted >= 2,
        "the writer and the reader use TLS ({encrypted})"
    );
    // Signed by another CA: refused before anything is sent.
    let refused = refusal(tls(&theirs.join("ca.pem")));
    assert!(refused.contains("cannot connect"), "{refused}");
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
    // A CA file that is not one: a clear error at open.
    std::fs::write(tmp.path().join("junk.pem"), "not a certificate").unwrap();
    let junk = refusal(tls(&tmp.path().join("junk.pem")));
    assert!(junk.contains("storage.ca_file"), "{junk}");
}

#[actix::test]
async fn a_member_commits_only_under_its_claims_and_hints_reach_every_node_after_the_commit() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let active = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    let member = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    for store in [&active, &member] {
        store.hint_writes_under(&["inbox/", "mailbox/"]);
    }
    let mut heard = active.hints();
    member.serve_as_member();
    let (jm, _, _) = open(member.clone(), Path::new("postgres"));
    let (ja, _, _) = open(active.clone(), Path::new("postgres"));

    // Outside a claim a member writes nothing, whatever it is.
    let refused = jm
        .commit(vec![put("inbox/a-1/1.e".into())])
        .await
        .unwrap_err();
    assert!(matches!(refused, JournalError::NotActive), "{refused}");
    assert!(
        jm.commit(Vec::new()).await.is_err(),
        "not even an empty commit"
    );
    assert_eq!(ja.get_meta("inbox/a-1/1.e").unwrap(), None);
    // Under its claim it does; the other node hears of it only once it is committed.
    let fence = member.claim("a-1", "node-b").unwrap();
    // Nothing heard yet (the listener's connection is up once a first hint can arrive).
    let listening = std::time::Instant::now();
    while listening.elapsed() < std::time::Duration::from_secs(2) {
        ja.commit(vec![put("job/x".into())]).await.unwrap();
        if let Ok(Some(h)) =
            tokio::time::timeout(std::time::Duration::from_millis(50), heard.recv()).await
        {
            panic!("a batch under no hinted prefix was hinted: {h}");
        }
    }
    jm.commit_under(vec![put("inbox/a-1/1.e".into())], Some(fence.clone()))
        .await
        .unwrap();
    let hint = tokio::time::timeout(std::time::Duration::from_secs(10), heard.recv())
        .await
        .expect("no hint within 10 s")
        .unwrap();
    // It names the agent written for, so that a node reads only its rows.
    let hint = tether_shared::journal::pg::Hint::parse(&hint);
    assert_eq!(hint.prefix, "inbox/");
    assert_eq!(hint.names, Some(["a-1".to_owned()].into()));
    assert!(
        ja.get_meta("inbox/a-1/1.e").unwrap().is_some(),
        "hinted before its commit"
    );
    assert_eq!(ja.count_meta("inbox/", 10).unwrap(), 1);
    // Once another node claims the agent, the member's claim writes nothing more, and nothing
    // is hinted.
    active.claim("a-1", "node-a").unwrap();
    let fenced = jm
        .commit_under(vec![put("inbox/a-1/2.e".into())], Some(fence))
        .await
        .unwrap_err();
    assert!(matches!(fenced, JournalError::Fenced { .. }), "{fenced}");
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(500), heard.recv())
            .await
            .is_err(),
        "a fenced commit was hinted"
    );
    assert_eq!(ja.count_meta("inbox/", 10).unwrap(), 1);
}

/// The active node's writes into the stream of an agent a member serves: fenced by two claims
/// (on the agent, and on the session's stream), refused once either moved; and the member's
/// read of mailbox rows with the stream's records, in one look.
#[actix::test]
async fn a_commit_under_two_claims_lands_only_while_both_hold_and_a_look_reads_rows_with_records() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let a = Arc::new(PgStore::open(&pg_options(pg.url())).unwrap());
    let agent = a.claim("agent-1", "node-b").unwrap();
    let stream = a.claim("out@agent-1", "node-b").unwrap();
    let both = Fence {
        also: Some((agent.claim.clone(), agent.epoch)),
        ..stream.clone()
    };
    let (j, _, _) = open(a.clone(), Path::new("postgres"));
    let l = log("out/commands/agent-1");
    let mut ops = appends(&l, 1..=3);
    ops.push(put("bell/agent-1/last".into()));
    j.commit_under(ops, Some(both.clone())).await.unwrap();
    assert_eq!(j.last_seq(&l).unwrap(), Some(Seq(3)));
    assert_eq!(j.last_seq(&log("out/commands/none")).unwrap(), None);

    // One look: the rows under a prefix, and the records after a seq.
    j.commit(vec![put("mailbox/agent-1/1".into())])
        .await
        .unwrap();
    let read = j
        .read_meta_and_logs_async(
            &["mailbox/agent-1/".into(), "bell/agent-1/".into()],
            &[(l.clone(), Seq(1)), (log("out/commands/none"), Seq::ZERO)],
            64,
            1 << 20,
        )
        .await
        .unwrap();
    let keys: Vec<&str> = read.meta.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["bell/agent-1/last", "mailbox/agent-1/1"]);
    let records: Vec<(String, u64)> = read
        .records
        .iter()
        .map(|(l, r)| (l.to_string(), r.seq.0))
        .collect();
    assert_eq!(
        records,
        [
            ("out/commands/agent-1".to_owned(), 2),
            ("out/commands/agent-1".to_owned(), 3)
        ]
    );

    // A new session on the same node raises the stream's claim only: refused.
    let newer_stream = a.claiming("out@agent-1", "node-b", None).await.unwrap();
    assert_eq!(newer_stream.epoch, stream.epoch + 1);
    let refused = j
        .commit_under(appends(&l, 4..=4), Some(both.clone()))
        .await
        .unwrap_err();
    assert!(matches!(refused, JournalError::Fenced { .. }), "{refused}");
    // Under the new stream claim it lands; then another node takes the agent: refused again.
    let renewed = Fence {
        epoch: newer_stream.epoch,
        ..both.clone()
    };
    j.commit_under(appends(&l, 4..=4), Some(renewed.clone()))
        .await
        .unwrap();
    a.claim("agent-1", "node-c").unwrap();
    let refused = j
        .commit_under(appends(&l, 5..=5), Some(renewed))
        .await
        .unwrap_err();
    assert!(matches!(refused, JournalError::Fenced { .. }), "{refused}");
    assert_eq!(
        seqs(&j, &l, 0, 10),
        [1, 2, 3, 4],
        "nothing refused was written"
    );
}
