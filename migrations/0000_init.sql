CREATE TABLE "artifacts" (
	"run_id" text NOT NULL,
	"step" text NOT NULL,
	"kind" text NOT NULL,
	"path" text NOT NULL,
	"sha256" text,
	"bytes" bigint,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "artifacts_run_id_path_pk" PRIMARY KEY("run_id","path")
);
--> statement-breakpoint
CREATE TABLE "kaggle_images" (
	"run_id" text NOT NULL,
	"rel_path" text NOT NULL,
	"label" integer NOT NULL,
	"status" text NOT NULL,
	"reason" text,
	"split" text,
	CONSTRAINT "kaggle_images_run_id_rel_path_pk" PRIMARY KEY("run_id","rel_path")
);
--> statement-breakpoint
CREATE TABLE "metrics" (
	"run_id" text NOT NULL,
	"step" text NOT NULL,
	"epoch" integer DEFAULT -1 NOT NULL,
	"name" text NOT NULL,
	"value" double precision NOT NULL,
	"recorded_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "metrics_run_id_step_epoch_name_pk" PRIMARY KEY("run_id","step","epoch","name")
);
--> statement-breakpoint
CREATE TABLE "patients" (
	"run_id" text NOT NULL,
	"patient_id" text NOT NULL,
	"status" text NOT NULL,
	"slices" integer,
	"tumor_slices" integer,
	"split" text,
	"output_dir" text,
	"error" text,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "patients_run_id_patient_id_pk" PRIMARY KEY("run_id","patient_id")
);
--> statement-breakpoint
CREATE TABLE "runs" (
	"id" text PRIMARY KEY NOT NULL,
	"status" text NOT NULL,
	"mode" text NOT NULL,
	"training_mode" text NOT NULL,
	"config" jsonb NOT NULL,
	"sources" jsonb NOT NULL,
	"data_dir" text NOT NULL,
	"idempotency_key" text,
	"error" text,
	"error_details" jsonb,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"started_at" timestamp with time zone,
	"finished_at" timestamp with time zone
);
--> statement-breakpoint
CREATE TABLE "steps" (
	"run_id" text NOT NULL,
	"name" text NOT NULL,
	"status" text NOT NULL,
	"queue" text NOT NULL,
	"job_id" text,
	"attempts" integer DEFAULT 0 NOT NULL,
	"started_at" timestamp with time zone,
	"finished_at" timestamp with time zone,
	"duration_ms" integer,
	"counts" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"error" text,
	"error_details" jsonb,
	CONSTRAINT "steps_run_id_name_pk" PRIMARY KEY("run_id","name")
);
--> statement-breakpoint
ALTER TABLE "artifacts" ADD CONSTRAINT "artifacts_run_id_runs_id_fk" FOREIGN KEY ("run_id") REFERENCES "public"."runs"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "kaggle_images" ADD CONSTRAINT "kaggle_images_run_id_runs_id_fk" FOREIGN KEY ("run_id") REFERENCES "public"."runs"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "metrics" ADD CONSTRAINT "metrics_run_id_runs_id_fk" FOREIGN KEY ("run_id") REFERENCES "public"."runs"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "patients" ADD CONSTRAINT "patients_run_id_runs_id_fk" FOREIGN KEY ("run_id") REFERENCES "public"."runs"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "steps" ADD CONSTRAINT "steps_run_id_runs_id_fk" FOREIGN KEY ("run_id") REFERENCES "public"."runs"("id") ON DELETE cascade ON UPDATE no action;--> statement-breakpoint
CREATE UNIQUE INDEX "runs_idempotency_key_idx" ON "runs" USING btree ("idempotency_key");--> statement-breakpoint
CREATE INDEX "runs_status_idx" ON "runs" USING btree ("status","created_at");