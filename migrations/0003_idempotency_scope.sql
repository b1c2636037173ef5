DROP INDEX "runs_idempotency_key_idx";--> statement-breakpoint
ALTER TABLE "runs" ADD COLUMN "idempotency_scope" text DEFAULT '' NOT NULL;--> statement-breakpoint
ALTER TABLE "runs" ADD COLUMN "request_hash" text;--> statement-breakpoint
CREATE UNIQUE INDEX "runs_idempotency_scope_key_idx" ON "runs" USING btree ("idempotency_scope","idempotency_key");