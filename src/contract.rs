//! The contract's JSON Schemas (`docs/schemas/`), compiled in so that
//! `group-provisioner schema …` prints exactly the files the tests check the code against.

/// The command body.
pub const COMMAND_SCHEMA: &str = include_str!("../docs/schemas/command.schema.json");
/// The `group.created` event body.
pub const CREATED_SCHEMA: &str = include_str!("../docs/schemas/group.created.schema.json");
/// The `group.create.failed` event body.
pub const FAILED_SCHEMA: &str = include_str!("../docs/schemas/group.create.failed.schema.json");
