//! The shared store suite against the SQLite store, plus SQLite specifics.

use portico_router::store::{suite, SqliteStore, Store};
use portico_router::StoreError;

#[test]
fn sqlite_store_passes_the_suite_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("portico.db");
    suite::run(&|| Box::new(SqliteStore::open(&path).expect("open")) as Box<dyn Store>);
}

#[test]
fn sqlite_store_versions_its_schema_and_uses_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("portico.db");
    let store = SqliteStore::open(&path).expect("open");
    assert_eq!(store.config_version().expect("version"), 0);
    store.close();
    let conn = rusqlite::Connection::open(&path).expect("raw open");
    let user_version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("user_version");
    assert_eq!(user_version, SqliteStore::SCHEMA_VERSION);
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    // A database from a newer router is refused rather than misread.
    conn.pragma_update(None, "user_version", 99).expect("bump");
    drop(conn);
    match SqliteStore::open(&path) {
        Err(StoreError::SchemaTooNew {
            found: 99,
            supported,
        }) if supported == SqliteStore::SCHEMA_VERSION => {}
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}
