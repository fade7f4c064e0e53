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

/// Opens the journal in `dir` again once the previous opener's writer threads let it go
/// (sled releases its lock when the last handle, the writer thread's, is gone).
async fn reopen(dir: &Path) -> (Journal, Recovered) {
    loop {
        match Journal::open(dir, &JournalOptions::default()) {
            Ok(j) => break j,
            Err(JournalError::Locked { .. }) => tokio::task::yield_now().await,
            Err(e) => panic!("{e}"),
        }
    }
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
    let (journal, rec) = reopen(dir.path()).await;
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

/// Files under the journal's blob directory.
fn blob_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(dir.join(store::BLOB_DIR)).unwrap() {
        for f in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out
}

#[actix::test]
async fn blobs_append_across_batches_read_by_range_and_free_their_file_on_delete() {
    let dir = tempfile::tempdir().unwrap();
    let (journal, _) = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
    let h = journal.handle();
    let (a, b) = (log("joblog/j1/0"), log("joblog/j1/1"));
    let append = |name: &LogName, bytes: &[u8]| Op::AppendBlob {
        name: name.clone(),
        bytes: bytes.to_vec(),
    };
    h.commit(vec![append(&a, b"hello "), append(&b, b"other")])
        .await
        .unwrap();
    h.commit(vec![append(&a, b"world"), append(&a, b"!")])
        .await
        .unwrap();
    assert_eq!(h.read_blob(&a, 0, 100).unwrap(), b"hello world!");
    assert_eq!(h.read_blob(&a, 6, 5).unwrap(), b"world");
    assert_eq!(h.read_blob(&a, 12, 5).unwrap(), b"");
    assert_eq!(h.read_blob(&log("joblog/none/0"), 0, 5).unwrap(), b"");
    assert_eq!(blob_files(dir.path()).len(), 2);

    h.commit(vec![Op::DeleteBlob { name: a.clone() }])
        .await
        .unwrap();
    assert_eq!(h.read_blob(&a, 0, 100).unwrap(), b"");
    assert_eq!(
        blob_files(dir.path()).len(),
        1,
        "the deleted blob's file is gone"
    );
    assert_eq!(h.read_blob(&b, 0, 100).unwrap(), b"other");
    // Deleted and written again in one batch: the new content stays.
    h.commit(vec![Op::DeleteBlob { name: b.clone() }, append(&b, b"new")])
        .await
        .unwrap();
    assert_eq!(h.read_blob(&b, 0, 100).unwrap(), b"new");
    assert_eq!(blob_files(dir.path()).len(), 1);
}

#[actix::test]
async fn bytes_past_a_blobs_committed_length_are_never_read_and_orphans_go_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let a = log("joblog/j1/0");
    {
        let (journal, _) = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
        journal
            .handle()
            .commit(vec![Op::AppendBlob {
                name: a.clone(),
                bytes: b"kept".to_vec(),
            }])
            .await
            .unwrap();
    }
    // A crash after the bytes of a batch were written, before its commit: they trail the
    // file. And a file whose blob was deleted without the file going.
    let files = blob_files(dir.path());
    assert_eq!(files.len(), 1);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&files[0])
        .unwrap();
    std::io::Write::write_all(&mut f, b" uncommitted").unwrap();
    let orphan_dir = dir.path().join(store::BLOB_DIR).join("00");
    std::fs::create_dir_all(&orphan_dir).unwrap();
    std::fs::write(orphan_dir.join("orphan"), b"x").unwrap();

    let (journal, _) = reopen(dir.path()).await;
    let h = journal.handle();
    assert!(
        !orphan_dir.join("orphan").exists(),
        "the orphan went at open"
    );
    assert_eq!(h.read_blob(&a, 0, 100).unwrap(), b"kept");
    h.commit(vec![Op::AppendBlob {
        name: a.clone(),
        bytes: b", more".to_vec(),
    }])
    .await
    .unwrap();
    assert_eq!(h.read_blob(&a, 0, 100).unwrap(), b"kept, more");
}
