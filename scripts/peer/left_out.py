"""Peer tests left out, per framework and file: test function -> why.

docs/integrations.md lists the same, by reason. Everything else in the files
scripts/peer_tests.py runs must pass and must build the swapped adapter.
"""

from __future__ import annotations

from typing import Final

CLUSTER: Final = (
    "RedisSession's checks of a RedisCluster client (built for localhost:6379, its pipeline mocked)"
)
LAYOUT: Final = (
    "reads or writes RedisSession's own keys (its message list, counter and created-"
    "at fields) directly"
)
PING: Final = "RedisSession.ping(), a method outside the Session protocol"
CLOSE: Final = (
    "the session's close() and closed state: an engine session has no close of its "
    "own (its engine flushes and closes at exit)"
)
TTL: Final = (
    "RedisSession's ttl= and its server-side expiration; the engine's retention is "
    "ttl_seconds on the engine (SPEC §13)"
)
COMPACTION: Final = (
    "OpenAIResponsesCompactionSession's atomic suffix replacement: a private hook of "
    "the SDK's own sessions, not part of the Session protocol"
)
SKIPPED: Final = (
    "skipped by the suite itself on its fakeredis path (it needs a Redis on localhost:6379)"
)
INTERNALS: Final = (
    "patches RedisSession's client, pipeline (WATCH/EXEC) or connection-pool "
    "internals (session._redis ...)"
)
SQLITE: Final = (
    "SQLiteSession's connections, locks and transactions (sqlite3 internals patched or inspected)"
)
CORRUPT: Final = (
    "writes corrupt rows into SQLiteSession's table with sqlite3 (the engine's own "
    "corrupt-row handling is SPEC §17, tested in tests/)"
)
LC_BASE: Final = (
    "tests LangChain's base class with its own subclasses, or its docstring: no "
    "history class to swap"
)
LC_SCHEMA: Final = "the input/output schema of RunnableWithMessageHistory: builds no history"
NO_SESSION: Final = "builds no session (an SDK helper or SessionSettings alone)"
ADK_DB: Final = "tests DatabaseSessionService's SQL engine, sessions or schema, not the contract"
ADK_SQLITE: Final = "tests SqliteSessionService's URL handling and files"
ADK_IN_MEMORY: Final = "reaches into InMemorySessionService.sessions (its private storage)"
ADK_STALE: Final = (
    "DatabaseSessionService's optimistic stale-session check: a Session read before "
    "another writer's append is refused there; ours, like InMemorySessionService, "
    "appends (events are ordered by Redis, state deltas merge key by key)"
)
ADK_VERTEX: Final = "tests VertexAiSessionService (a Google Cloud client)"
ADK_NAMESPACE: Final = "tests google.adk.sessions' module namespace"
LI_PERSIST: Final = (
    "tests SimpleChatStore's JSON-file persistence (persist / from_persist_path); "
    "the adapter persists to Redis on every call"
)


#: framework -> test file -> test function (all its parameters) -> why.
LEFT_OUT: Final[dict[str, dict[str, dict[str, str]]]] = {
    "langchain": {
        "tests/unit_tests/chat_history/test_chat_history.py": {
            "test_chat_history_deprecated": LC_BASE,
            "test_add_message_implementation_only": LC_BASE,
            "test_bulk_message_implementation_only": LC_BASE,
            "test_async_interface": LC_BASE,
        },
        "tests/unit_tests/runnables/test_history.py": {
            "test_get_input_schema_input_dict": LC_SCHEMA,
            "test_get_output_schema": LC_SCHEMA,
            "test_get_input_schema_input_messages": LC_SCHEMA,
        },
    },
    "openai-agents": {
        "tests/extensions/memory/test_redis_session.py": {
            "test_redis_session_rejects_cluster_transactions_before_pipeline": CLUSTER,
            "test_redis_cluster_reads_and_subclass_writes": CLUSTER,
            "test_colliding_session_clear_preserves_existing_session": LAYOUT,
            "test_colliding_counter_rejects_ttl_write_before_side_effects": LAYOUT,
            "test_clear_rechecks_key_types_after_concurrent_replacement": LAYOUT,
            "test_released_redis_layout_remains_usable": LAYOUT,
            "test_get_next_id_method": LAYOUT,
            "test_add_items_preserves_created_at_metadata": LAYOUT,
            "test_get_items_limit_skips_corrupt_newest_messages": LAYOUT,
            "test_corrupted_data_handling": LAYOUT,
            "test_add_items_rejects_wrong_metadata_key_type_before_writing": LAYOUT,
            "test_redis_connectivity": PING,
            "test_ping_connection_failure": PING,
            "test_redis_session_ping_raises_after_close": PING,
            "test_close_method_coverage": CLOSE,
            "test_redis_session_closed_operations_raise_runtime_error": CLOSE,
            "test_redis_session_closed_rejects_empty_add_items": CLOSE,
            "test_redis_session_close_is_idempotent": CLOSE,
            "test_redis_session_failed_cleanup_is_terminal_and_retried": CLOSE,
            "test_redis_session_cancelled_cleanup_is_terminal_and_retried": CLOSE,
            "test_redis_session_close_is_noop_for_injected_client": CLOSE,
            "test_redis_session_operation_waiting_behind_close_raises": CLOSE,
            "test_add_items_applies_ttl_in_the_write_transaction": TTL,
            "test_add_items_rejects_unrepresentable_ttl_before_writing": TTL,
            "test_add_items_uses_server_absolute_expiration_after_serialization": TTL,
            "test_add_items_refreshes_server_timestamps_after_watch_retry": TTL,
            "test_compaction_replaces_redis_history_atomically": COMPACTION,
            "test_atomic_replacement_preserves_clear_add_metadata": COMPACTION,
            "test_atomic_replacement_serializes_before_deleting_history": COMPACTION,
            "test_compaction_subclass_retains_overridden_storage_methods": COMPACTION,
            "test_compaction_cancel_after_redis_commit_invalidates_cached_history": COMPACTION,
            "test_atomic_replacement_rejects_colliding_counter_key": COMPACTION,
            "test_cancelled_redis_compaction_handoff_remains_resumable": COMPACTION,
            "test_from_url_constructor": SKIPPED,
            "test_internal_client_ownership": SKIPPED,
            "test_real_redis_decode_responses_compatibility": SKIPPED,
            "test_session_settings_from_url": SKIPPED,
            "test_ambiguous_exec_watch_error_is_not_retried": INTERNALS,
            "test_blocking_pool_cancellation_completion_owns_release": INTERNALS,
            "test_blocking_pool_detached_disconnect_notifies_waiter": INTERNALS,
            "test_blocking_pool_listener_failure_notifies_waiter": INTERNALS,
            "test_cancelled_connection_acquisition_is_discarded_before_release": INTERNALS,
            "test_cancelled_in_flight_watch_command_reconnects_before_pool_reuse": INTERNALS,
            "test_cancelled_watch_releases_single_connection_pool": INTERNALS,
            "test_mutation_cancellation_waits_for_authoritative_outcome": INTERNALS,
            "test_ordinary_pool_cancellation_completion_owns_release": INTERNALS,
            "test_post_commit_cancellation_propagates_after_cleanup": INTERNALS,
            "test_post_commit_detached_close_failure_is_quarantined": INTERNALS,
            "test_pre_exec_cancellation_skips_pipeline_reset": INTERNALS,
            "test_pre_exec_close_failure_is_quarantined": INTERNALS,
            "test_reconnect_marked_inside_release_failure_is_detached": INTERNALS,
            "test_redis81_standard_pool_checkout_records_native_observability": INTERNALS,
            "test_redis8_blocking_pool_checkout_preserves_native_timing": INTERNALS,
            "test_release_failure_after_reborrow_preserves_new_borrower": INTERNALS,
            "test_transparent_overridden_pool_release_is_supported": INTERNALS,
            "test_session_settings_resolve": NO_SESSION,
        },
        "tests/memory/test_session.py": {
            "test_sqlite_session_close_closes_worker_thread_connections": SQLITE,
            "test_sqlite_session_reaps_connections_from_exited_worker_threads": SQLITE,
            "test_sqlite_session_closes_retired_connections_before_the_next_allocation": SQLITE,
            "test_sqlite_session_keeps_connections_of_live_worker_threads": SQLITE,
            "test_sqlite_session_file_lock_is_shared_across_instances": SQLITE,
            "test_sqlite_session_failed_add_items_releases_write_lock": SQLITE,
            "test_sqlite_session_failed_clear_session_rolls_back": SQLITE,
            "test_sqlite_session_failed_pop_item_releases_write_lock": SQLITE,
            "test_sqlite_session_rollback_failure_evicts_connection": SQLITE,
            "test_sqlite_session_close_retries_quarantined_connection": SQLITE,
            "test_sqlite_session_post_commit_cancellation_propagates_after_known_outcome": SQLITE,
            "test_sqlite_session_pop_item_skips_corrupt_most_recent": CORRUPT,
            "test_sqlite_session_pop_item_returns_none_after_dropping_only_corrupt_rows": CORRUPT,
            "test_sqlite_session_get_items_limit_skips_corrupt_newest_rows": CORRUPT,
            "test_sqlite_session_get_items_session_settings_limit_skips_corrupt_rows": CORRUPT,
            "test_sqlite_session_closed_rejects_empty_add_items": CLOSE,
            "test_await_mutation_cancellation_hides_later_failure_without_loop_error": NO_SESSION,
            "test_session_memory_disabled_parametrized": NO_SESSION,
            "test_session_settings_resolve": NO_SESSION,
        },
    },
    "adk": {
        "tests/unittests/sessions/test_session_service.py": {
            "test_database_session_service_enables_pool_pre_ping_by_default": ADK_DB,
            "test_database_session_service_strips_timezone_for_dialect": ADK_DB,
            "test_database_session_service_preserves_timezone_for_other_dialects": ADK_DB,
            "test_database_session_service_respects_pool_pre_ping_override": ADK_DB,
            "test_database_session_service_creates_read_only_engine_for_spanner": ADK_DB,
            "test_database_session_service_creates_read_only_engine_for_other_dialects": ADK_DB,
            "test_sqlite_session_service_accepts_sqlite_urls": ADK_SQLITE,
            "test_sqlite_session_service_preserves_uri_query_parameters": ADK_SQLITE,
            "test_sqlite_session_service_accepts_absolute_sqlite_urls": ADK_SQLITE,
            "test_database_session_service_get_session_uses_read_only_factory": ADK_DB,
            "test_database_session_service_list_sessions_uses_read_only_factory": ADK_DB,
            "test_append_event_to_stale_session": ADK_STALE,
            "test_append_event_raises_if_app_state_row_missing": ADK_DB,
            "test_append_event_raises_if_user_state_row_missing": ADK_DB,
            "test_append_event_concurrent_stale_sessions_reject_stale_writer": ADK_STALE,
            "test_append_event_allows_timestamp_drift_for_current_session": ADK_DB,
            "test_append_event_allows_markerless_current_session": ADK_DB,
            "test_append_event_when_session_is_same_ref_as_storage_session": ADK_IN_MEMORY,
            "test_create_session_calls_rollback_on_commit_failure": ADK_DB,
            "test_append_event_calls_rollback_on_commit_failure": ADK_DB,
            "test_append_event_reads_storage_revision_before_commit": ADK_DB,
            "test_create_session_reads_storage_revision_before_commit": ADK_DB,
            "test_delete_session_calls_rollback_on_commit_failure": ADK_DB,
            "test_service_recovers_after_multiple_failures": ADK_DB,
            "test_concurrent_prepare_tables_no_race_condition": ADK_DB,
            "test_prepare_tables_serializes_schema_detection_and_creation": ADK_DB,
            "test_get_or_create_state_returns_existing_row": ADK_DB,
            "test_get_or_create_state_creates_new_row": ADK_DB,
            "test_get_or_create_state_handles_race_condition": ADK_DB,
            "test_create_session_sequential_same_app_name": ADK_DB,
            "test_prepare_tables_idempotent_after_creation": ADK_DB,
            "test_public_prepare_tables_eager_initialization": ADK_DB,
            "test_append_event_locks_only_scopes_with_deltas": ADK_DB,
            "test_vertex_ai_session_service_raises_not_implemented_for_get_user_state": ADK_VERTEX,
            "test_database_session_service_visible_in_module_namespace": ADK_NAMESPACE,
        },
    },
    "llama-index": {
        "llama-index-core/tests/storage/chat_store/test_simple_chat_store.py": {
            "test_persist_non_ascii_unescaped": LI_PERSIST,
        },
    },
}
