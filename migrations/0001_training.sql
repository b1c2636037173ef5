ALTER TABLE "runs" ADD COLUMN "overrides" jsonb;--> statement-breakpoint
ALTER TABLE "runs" ADD COLUMN "data_run_id" text;--> statement-breakpoint
ALTER TABLE "runs" ADD COLUMN "device" text;