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

/// What the journal's directory holds, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn data_file_len(dir: &Path) -> u64 {
    std::fs::metadata(generation::data_file(dir).unwrap())
        .unwrap()
        .len()
}

/// Churn: every round (its number is its record's seq) rewrites 100 entries of 2 KiB and removes the previous round's
/// records, so the live data stays about 200 KiB while sled is handed megabytes.
async fn churn(h: &JournalHandle, rounds: std::ops::RangeInclusive<u64>) {
    let l = log("in/events/a");
    for round in rounds {
        let mut ops: Vec<Op> = (0..100)
            .map(|i| Op::PutMeta {
                key: format!("job/{i}"),
                value: vec![(round % 251) as u8; 2048],
            })
            .collect();
        ops.push(Op::Append {
            log: l.clone(),
            seq: Seq(round),
            payload: round.to_be_bytes().to_vec(),
        });
        if round > 10 {
            ops.push(Op::TruncateThrough {
                log: l.clone(),
                upto: Seq(round - 10),
            });
        }
        h.commit(ops).await.unwrap();
    }
}

#[actix::test]
async fn churn_is_compacted_away_and_every_live_entry_survives() {
    let dir = tempfile::tempdir().unwrap();
    let opts = JournalOptions {
        sled: SledOptions {
            compact_after_growth_bytes: 1024 * 1024,
            ..SledOptions::default()
        },
        ..JournalOptions::default()
    };
    let (journal, _) = Journal::open(dir.path(), &opts).unwrap();
    let h = journal.handle();
    h.commit(vec![Op::AppendBlob {
        name: log("joblog/j/0"),
        bytes: b"a step's log".to_vec(),
    }])
    .await
    .unwrap();
    let mut largest = 0;
    for i in 0..20 {
        churn(&h, i * 25 + 1..=i * 25 + 25).await; // about 5 MB handed to sled each time
        largest = largest.max(data_file_len(dir.path()));
    }
    // Compactions run on a thread of their own: wait for the last one to finish.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while h.observe().compacting {
        assert!(
            std::time::Instant::now() < deadline,
            "a compaction never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // How many compactions the churn triggers depends on how fast this machine runs it (they
    // are paced, one at a time); the bounds below are what matters, and without any compaction
    // the file would pass 20 MB.
    let compactions = h.observe().compactions;
    assert!(compactions >= 1, "{compactions} compactions");
    // Live data is about 200 KiB; without compaction the file passes 20 MB. Compactions are
    // paced and run one at a time, so on a loaded machine the churn may run ahead of them for
    // a while: the bound during the churn leaves room for that, and once they caught up the
    // file is back near the threshold (1 MiB of growth over the last compaction's size).
    assert!(
        largest < 16 * 1024 * 1024,
        "data file reached {largest} bytes"
    );
    let settled = data_file_len(dir.path());
    assert!(
        settled < 6 * 1024 * 1024,
        "data file is {settled} bytes once compactions caught up"
    );
    // The last compaction's old generation is removed as it ends, unless sled's flusher was
    // still writing into it then (a loaded machine): then by the next compaction or open.
    let live = entries(dir.path());
    assert!(
        live.iter().filter(|n| n.starts_with("sled.")).count() <= 2,
        "old generations are removed: {live:?}"
    );
    assert!(!live.contains(&"db".to_owned()), "{live:?}");
    drop(journal);
    drop(h);

    let (journal, rec) = reopen(dir.path()).await;
    let live = entries(dir.path());
    assert_eq!(
        live.iter().filter(|n| n.starts_with("sled.")).count(),
        1,
        "old generations are removed at the latest when the journal opens: {live:?}"
    );
    let h = journal.handle();
    assert!(!rec.created);
    assert_eq!(rec.logs["in/events/a"].last, Seq(500));
    assert_eq!(rec.logs["in/events/a"].records, 10);
    for i in 0..100 {
        assert_eq!(
            h.get_meta(&format!("job/{i}")).unwrap(),
            Some(vec![(500 % 251) as u8; 2048])
        );
    }
    assert_eq!(
        h.read_blob(&log("joblog/j/0"), 0, 100).unwrap(),
        b"a step's log"
    );
}

#[actix::test]
async fn a_compaction_cut_short_is_removed_at_open_and_the_live_generation_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (journal, _) = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
        churn(&journal.handle(), 1..=3).await;
    }
    // A crash while a compaction wrote the next generation, and one during `CURRENT`'s
    // replacement.
    let next = dir.path().join("sled.1");
    std::fs::create_dir_all(&next).unwrap();
    std::fs::write(next.join("db"), b"half a database").unwrap();
    std::fs::write(dir.path().join(".CURRENT.tmp-0123"), b"sled.1\n").unwrap();
    let (journal, rec) = reopen(dir.path()).await;
    assert_eq!(rec.logs["in/events/a"].last, Seq(3));
    assert_eq!(
        journal.handle().get_meta("job/0").unwrap(),
        Some(vec![3; 2048])
    );
    assert_eq!(
        entries(dir.path()),
        ["CURRENT", "INCARNATION", "files", "sled.0"]
    );
}

#[actix::test]
async fn a_journal_from_before_generations_opens_in_place_and_moves_at_its_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let inc = {
        let (journal, _) = Journal::open(dir.path(), &JournalOptions::default()).unwrap();
        churn(&journal.handle(), 1..=3).await;
        journal.handle().incarnation().to_owned()
    };
    // The layout of a journal written before generations: sled's files at the top.
    for f in entries(&dir.path().join("sled.0")) {
        std::fs::rename(dir.path().join("sled.0").join(&f), dir.path().join(&f)).unwrap();
    }
    std::fs::remove_dir(dir.path().join("sled.0")).unwrap();
    std::fs::remove_file(dir.path().join("CURRENT")).unwrap();

    let store = loop {
        match SledStore::open(dir.path(), &SledOptions::default()) {
            Ok(s) => break s,
            Err(JournalError::Locked { .. }) => tokio::task::yield_now().await,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(!dir.path().join("CURRENT").exists(), "opened in place");
    let c = store.compact().unwrap();
    assert!(c.entries > 100, "{c:?}");
    assert_eq!(store.compactions(), 1);
    assert_eq!(
        entries(dir.path()),
        ["CURRENT", "INCARNATION", "files", "sled.1"]
    );
    drop(store);
    let (journal, rec) = reopen(dir.path()).await;
    assert_eq!(rec.incarnation, inc);
    assert_eq!(rec.logs["in/events/a"].last, Seq(3));
    assert_eq!(
        journal.handle().get_meta("job/99").unwrap(),
        Some(vec![3; 2048])
    );
}
