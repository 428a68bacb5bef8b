//! TEMP stub until the bench lands.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {}
pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    Ok(())
}
