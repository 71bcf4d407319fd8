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
}
