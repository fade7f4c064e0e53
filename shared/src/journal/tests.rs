//! Unit tests of the parent module.

use super::*;

fn log(name: &str) -> LogName {
    LogName::new(name).unwrap()
}

#[actix::test]
async fn commits_reads_back_and_truncates() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, rec) = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
    assert!(rec.created);
    let addr = journal.start();
    let l = log("out/events");
    let ops = (1..=5)
        .map(|i| Op::Append {
            log: l.clone(),
            seq: Seq(i),
            payload: vec![i as u8; 10],
        })
        .collect();
    addr.send(Commit { ops }).await.unwrap().unwrap();
    addr.send(Commit {
        ops: vec![Op::TruncateThrough {
            log: l.clone(),
            upto: Seq(2),
        }],
    })
    .await
    .unwrap()
    .unwrap();
    let recs = addr
        .send(ReadLog {
            log: l.clone(),
            after: Seq::ZERO,
            limit: 100,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        recs.iter().map(|r| r.seq.0).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    let recs = addr
        .send(ReadLog {
            log: l.clone(),
            after: Seq(3),
            limit: 1,
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recs.iter().map(|r| r.seq.0).collect::<Vec<_>>(), vec![4]);
    let health = addr.send(Observe).await.unwrap();
    assert_eq!(health.commits, 2);
    assert!(health.syncs >= health.batches, "{health:?}");
}

#[actix::test]
async fn state_and_incarnation_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let inc = {
        let (journal, _) = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
        let h = journal.handle();
        h.commit(vec![Op::PutMeta {
            key: "wm".into(),
            value: b"7".to_vec(),
        }])
        .await
        .unwrap();
        h.incarnation().to_owned()
    };
    // sled releases its lock when the last handle (the writer thread's) is gone.
    let (journal, rec) = loop {
        match Journal::open(dir.path(), &JournalOptions::default()) {
            Ok(j) => break j,
            Err(JournalError::Locked { .. }) => tokio::task::yield_now().await,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(!rec.created);
    assert_eq!(rec.incarnation, inc);
    assert_eq!(
        journal.handle().get_meta("wm").unwrap(),
        Some(b"7".to_vec())
    );
}

#[actix::test]
async fn a_second_opener_is_told_the_journal_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
    match Journal::open(dir.path(), &JournalOptions::default()) {
        Err(e @ JournalError::Locked { .. }) => {
            assert!(e.to_string().contains("in use by another process"))
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("opened a journal another opener holds"),
    }
}

#[actix::test]
async fn refuses_oversized_records() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
    let op = Op::Append {
        log: log("x"),
        seq: Seq(1),
        payload: vec![0; MAX_RECORD_BYTES + 1],
    };
    assert!(matches!(
        journal.handle().commit(vec![op]).await,
        Err(JournalError::TooLarge { .. })
    ));
    assert_eq!(
        journal.handle().read_log(&log("x"), Seq::ZERO, 10).unwrap(),
        vec![]
    );
}
