//! A minimal publisher of one "create group" command (docs/contract.md §7), with lapin.
//!
//! ```sh
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f cargo run --example publish -- ORG-2001 "New Sales Division" 1000
//! ```
//!
//! Persistent, with publisher confirms and `mandatory`, so a message the broker cannot
//! route (a wrong exchange or routing key) is an error here instead of silently lost. Exit
//! code 0 only when the broker confirmed the command.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(ext_id), Some(name), Some(parent)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: publish EXT_ID NAME PARENT_ID".into());
    };
    let parent: i64 = parent.parse()?;
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let body = serde_json::json!({
        "org_unit_ext_id": ext_id, "org_unit_name": name, "org_unit_parent_id": parent,
    });

    let connection = Connection::connect(&url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let message_id = uuid::Uuid::new_v4().to_string();
    let confirm = channel
        .basic_publish(
            "provisioning".into(),
            "group.create".into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body.to_string().as_bytes(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(message_id.as_str().into()),
        )
        .await?
        .await?;
    connection.close(200, "done".into()).await?;
    match confirm {
        Confirmation::Ack(None) => {
            println!("sent {ext_id} as message {message_id}");
            Ok(())
        }
        Confirmation::Ack(Some(_)) => {
            Err("not sent: the broker could not route it (exchange or routing key?)".into())
        }
        Confirmation::Nack(_) => Err("not sent: the broker refused it".into()),
        Confirmation::NotRequested => Err("not sent: confirms are off".into()),
    }
}
