// Outlook / Microsoft 365 mailbox connector: everything it runs on, provisioned by `azd up`.
//
//   resource group
//   ├── user-assigned managed identity          (modules/identity.bicep)
//   ├── storage account, shared key OFF         (modules/storage.bicep)
//   │     deployment container, tables, queues
//   ├── Key Vault, RBAC, purge protection        (modules/keyvault.bicep)
//   ├── Log Analytics + Application Insights     (modules/monitoring.bicep)
//   ├── role assignments, least privilege        (modules/roles.bicep)
//   └── Flex Consumption plan + function app     (modules/functionapp.bicep)
//
// The token key ring is created by the azd postprovision hook (scripts/postprovision.*), never
// here, so that it is truly random and re-provisioning never rotates it.
//
// The Entra app registration is not created here by default (that needs Application.ReadWrite rights
// in Entra): infra/entra-app/main.bicep (Microsoft Graph Bicep extension) is the optional path, and
// docs/deploy.md gives the portal / az steps, including the federated credential for the identity.

targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('azd environment name (AZURE_ENV_NAME); names and tags every resource.')
param environmentName string

@minLength(1)
// The regions that offer Flex Consumption, as Microsoft's Flex Consumption azd quickstart lists them
// (Azure-Samples/functions-quickstart-python-http-azd, infra/main.bicep). azd offers only these; the live list is
// `az functionapp list-flexconsumption-locations -o table` (docs/deploy.md): add a new region here when it appears.
@description('Region for all resources (AZURE_LOCATION). It must offer the Flex Consumption plan.')
@allowed([
  'australiaeast'
  'australiasoutheast'
  'brazilsouth'
  'canadacentral'
  'centralindia'
  'centralus'
  'eastasia'
  'eastus'
  'eastus2'
  'francecentral'
  'germanywestcentral'
  'italynorth'
  'japaneast'
  'koreacentral'
  'northcentralus'
  'northeurope'
  'norwayeast'
  'southafricanorth'
  'southcentralus'
  'southeastasia'
  'southindia'
  'spaincentral'
  'swedencentral'
  'uaenorth'
  'uksouth'
  'ukwest'
  'westcentralus'
  'westeurope'
  'westus'
  'westus2'
  'westus3'
])
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Object id of the principal running azd (AZURE_PRINCIPAL_ID). Granted Key Vault Secrets Officer so the postprovision hook can write the token key ring. Empty to skip.')
param principalId string = ''

@description('Also grant the principal running azd Storage Table Data Contributor, for `python -m shared.cli reencrypt` after a key rotation (GRANT_DEPLOYER_DATA_ROLES).')
param grantDeployerDataRoles bool = false

@description('Type of principalId: User for a person, ServicePrincipal for a CI identity.')
@allowed([
  'User'
  'ServicePrincipal'
  'Group'
])
param principalType string = 'User'

@description('Resource group name; empty for rg-<environmentName>.')
param resourceGroupName string = ''

// ---- Entra app registration ------------------------------------------------------------------

@description('Application (client) id of the Entra app registration (MS_CLIENT_ID). Empty only while bootstrapping with infra/entra-app (the app refuses to start until it is set).')
param msClientId string = ''

@description('How the app authenticates to Entra (MS_CLIENT_CREDENTIAL): secret (Key Vault secret), certificate (Key Vault certificate) or managed_identity (federated credential on the app registration; work/school accounts only).')
@allowed([
  'secret'
  'certificate'
  'managed_identity'
])
param msClientCredential string = 'secret'

@description('Key Vault certificate name for msClientCredential=certificate (MS_CLIENT_CERT_NAME).')
param msClientCertName string = 'ms-client-cert'

@description('Audience of the managed identity token used as the federated assertion (MS_CLIENT_ASSERTION_AUDIENCE).')
param msClientAssertionAudience string = 'api://AzureADTokenExchange'

@secure()
@description('Entra client secret. Written to Key Vault as ms-client-secret only when non-empty; never an output, never an app setting.')
param msClientSecret string = ''

@description('Tenant segment: common, organizations, consumers or a tenant id (MS_TENANT).')
param msTenant string = 'common'

@description('Entra authority host (MS_AUTHORITY_HOST).')
param msAuthorityHost string = 'https://login.microsoftonline.com'

@description('Delegated Graph scopes requested (MS_SCOPES); offline_access is always added by the app.')
param msScopes string = 'User.Read Mail.ReadWrite Mail.Send'

@description('Application permissions for team mailboxes (MS_APP_ROLES), granted by each tenant\'s admin consent.')
param msAppRoles string = 'Mail.ReadWrite Mail.Send'

@description('Microsoft Graph base URL (GRAPH_BASE_URL).')
param graphBaseUrl string = 'https://graph.microsoft.com/v1.0'

// ---- Callers of the connector ----------------------------------------------------------------

@minLength(1)
@description('Expected iss of caller JWTs (AUTH_ISSUER).')
param authIssuer string

@minLength(1)
@description('Expected aud of caller JWTs (AUTH_AUDIENCE).')
param authAudience string

@minLength(1)
@description('JWKS URL of the caller token issuer (AUTH_JWKS_URL).')
param authJwksUrl string

@description('Comma-separated allowed returnUrl prefixes (ALLOWED_RETURN_URLS).')
param allowedReturnUrls string = ''

@description('Receiver of account lifecycle webhooks (WEBHOOK_URL); empty turns webhooks off.')
param webhookUrl string = ''

@secure()
@description('Webhook HMAC secret. Written to Key Vault when non-empty; otherwise the postprovision hook generates one once.')
param webhookSecret string = ''

@description('Public base URL override (PUBLIC_BASE_URL), e.g. a custom domain. Empty: the function app\'s https default host name. A trailing slash is removed.')
param publicBaseUrl string = ''

// ---- Behaviour -------------------------------------------------------------------------------

@description('NCRONTAB of the proactive refresh timer (REFRESH_SCHEDULE).')
param refreshSchedule string = '0 */5 * * * *'

@description('NCRONTAB of the clean-up timer (CLEANUP_SCHEDULE).')
param cleanupSchedule string = '0 17 * * * *'

@description('Idle accounts get a refresh-token keep-alive this often, in days (KEEPALIVE_DAYS).')
param keepaliveDays string = '7'

@description('Longest accepted lifetime of a caller JWT, exp - iat, in seconds (AUTH_MAX_TOKEN_LIFETIME_SECONDS).')
param authMaxTokenLifetimeSeconds string = '86400'

@description('POST .../refresh within this many seconds of the last one answers its result (FORCED_REFRESH_COALESCE_SECONDS; 0: off).')
param forcedRefreshCoalesceSeconds string = '10'

@description('Cap on one send request\'s attachments in bytes (SEND_MAX_TOTAL_BYTES).')
param sendMaxTotalBytes string = '104857600'

@description('Inbound mail notifications (NOTIFICATIONS_ENABLED): true, false or auto (on when PUBLIC_BASE_URL is https).')
@allowed([
  'auto'
  'true'
  'false'
])
param notificationsEnabled string = 'auto'

@description('Mailbox events to produce (MAIL_EVENTS), comma-separated: message.received, message.sent, message.updated, message.deleted.')
param mailEvents string = 'message.received,message.sent'

@description('Rich notifications (NOTIFICATIONS_RESOURCE_DATA): Graph sends message summaries encrypted to a Key Vault certificate; the postprovision hook creates it.')
@allowed([
  'false'
  'true'
])
param notificationsResourceData string = 'false'

@description('Key Vault certificate for rich notifications (NOTIFICATION_CERT_NAME).')
param notificationCertName string = 'notification-cert'

// ---- Sizing ----------------------------------------------------------------------------------

@description('Maximum instances Flex Consumption scales out to (40-1000, Microsoft\'s Flex Consumption limits).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Instance memory size in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Zone-redundant Flex Consumption plan (ZONE_REDUNDANT); only where the region offers it, with ZRS storage.')
param zoneRedundant bool = false

@description('Always-ready instances for the HTTP trigger group (ALWAYS_READY_HTTP_INSTANCES); 0 = none. Spares the OAuth callback a cold start, at a fixed cost.')
@minValue(0)
@maxValue(1000)
param alwaysReadyHttpInstances int = 0

@description('Storage replication. Use Standard_LRS in a region without availability zones.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param storageSkuName string = 'Standard_ZRS'

@description('Days a deleted Key Vault or secret stays recoverable (7-90).')
@minValue(7)
@maxValue(90)
param keyVaultSoftDeleteRetentionInDays int = 90

// ---- Operations (infra/modules/operations.bicep, docs/operations.md) ---------------------------

@description('E-mail address alerted by the operations alert rules (OPERATIONS_ALERT_EMAIL); empty: no action group.')
param alertEmail string = ''

// ---- Names -----------------------------------------------------------------------------------

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var serviceName = 'api'
var functionAppName = 'func-${resourceToken}'
var deploymentContainerName = 'app-package-${resourceToken}'
var clientSecretName = 'ms-client-secret'
var tokenKeysSecretName = 'token-encryption-keys'
var webhookSecretName = 'webhook-secret'
// PUBLIC_BASE_URL is normalised here, once: the app strips a trailing slash too (shared/config.py),
// so the REDIRECT_URI output and the app's redirect URI are the same string (else AADSTS50011).
var publicBaseUrlNormalised = endsWith(publicBaseUrl, '/') ? substring(publicBaseUrl, 0, length(publicBaseUrl) - 1) : publicBaseUrl
var tableNames = [
  'accounts'
  'oauthstates'
  'refreshindex'
  'idempotency'
  'subscriptions'
  'subscriptionindex'
  'seenmessages'
]
var queueNames = [
  'refresh-jobs'
  'refresh-jobs-poison'
  'webhook-deliveries'
  'webhook-deliveries-poison'
  'notification-jobs'
  'notification-jobs-poison'
]

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: empty(resourceGroupName) ? 'rg-${environmentName}' : resourceGroupName
  location: location
  tags: tags
}

module identity 'modules/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    skuName: storageSkuName
    deploymentContainerName: deploymentContainerName
    tableNames: tableNames
    queueNames: queueNames
  }
}

module keyVault 'modules/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv-${resourceToken}'
    location: location
    tags: tags
    softDeleteRetentionInDays: keyVaultSoftDeleteRetentionInDays
    clientSecretName: clientSecretName
    clientSecretValue: msClientSecret
    webhookSecretName: webhookSecretName
    webhookSecretValue: webhookSecret
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
  }
}

module operations 'modules/operations.bicep' = {
  name: 'operations'
  scope: rg
  params: {
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    location: location
    tags: tags
    namePrefix: 'connector-${resourceToken}'
    alertEmail: alertEmail
  }
}

module roles 'modules/roles.bicep' = {
  name: 'roles'
  scope: rg
  params: {
    appPrincipalId: identity.outputs.principalId
    deployerPrincipalId: principalId
    deployerPrincipalType: principalType
    grantDeployerDataRoles: grantDeployerDataRoles
    grantDeployerCertificatesOfficer: msClientCredential == 'certificate' || notificationsResourceData == 'true'
    storageAccountName: storage.outputs.name
    keyVaultName: keyVault.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
  }
}

module functionApp 'modules/functionapp.bicep' = {
  name: 'functionapp'
  scope: rg
  dependsOn: [
    roles
  ]
  params: {
    name: functionAppName
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    appTags: union(tags, {
      'azd-service-name': serviceName
    })
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    storageAccountName: storage.outputs.name
    deploymentContainerName: storage.outputs.deploymentContainerName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    keyVaultUri: keyVault.outputs.uri
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    zoneRedundant: zoneRedundant
    alwaysReadyHttpInstances: alwaysReadyHttpInstances
    publicBaseUrl: publicBaseUrlNormalised
    // The app's own settings (shared/config.py SETTINGS, non-local). KEY_VAULT_URL,
    // PUBLIC_BASE_URL and the platform settings are added by the module.
    appSettings: {
      MS_CLIENT_ID: msClientId
      MS_CLIENT_SECRET_NAME: clientSecretName
      MS_CLIENT_CREDENTIAL: msClientCredential
      MS_CLIENT_CERT_NAME: msClientCertName
      MS_CLIENT_ASSERTION_AUDIENCE: msClientAssertionAudience
      TOKEN_KEYS_SECRET_NAME: tokenKeysSecretName
      MS_AUTHORITY_HOST: msAuthorityHost
      MS_TENANT: msTenant
      MS_SCOPES: msScopes
      MS_APP_ROLES: msAppRoles
      GRAPH_BASE_URL: graphBaseUrl
      AUTH_ISSUER: authIssuer
      AUTH_AUDIENCE: authAudience
      AUTH_JWKS_URL: authJwksUrl
      ALLOWED_RETURN_URLS: allowedReturnUrls
      WEBHOOK_URL: webhookUrl
      WEBHOOK_SECRET_NAME: webhookSecretName
      REFRESH_SCHEDULE: refreshSchedule
      CLEANUP_SCHEDULE: cleanupSchedule
      KEEPALIVE_DAYS: keepaliveDays
      AUTH_MAX_TOKEN_LIFETIME_SECONDS: authMaxTokenLifetimeSeconds
      FORCED_REFRESH_COALESCE_SECONDS: forcedRefreshCoalesceSeconds
      SEND_MAX_TOTAL_BYTES: sendMaxTotalBytes
      NOTIFICATIONS_ENABLED: notificationsEnabled
      MAIL_EVENTS: mailEvents
      NOTIFICATIONS_RESOURCE_DATA: notificationsResourceData
      NOTIFICATION_CERT_NAME: notificationCertName
    }
  }
}

// ---- Outputs (azd stores them in the environment; none is a secret) ---------------------------

output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output FUNCTION_APP_URL string = functionApp.outputs.url
output PUBLIC_BASE_URL string = functionApp.outputs.publicBaseUrl
@description('Register exactly this as a Web redirect URI of the Entra app.')
output REDIRECT_URI string = '${functionApp.outputs.publicBaseUrl}/api/connect/microsoft/callback'
output KEY_VAULT_NAME string = keyVault.outputs.name
output KEY_VAULT_URL string = keyVault.outputs.uri
output MS_CLIENT_SECRET_NAME string = clientSecretName
output TOKEN_KEYS_SECRET_NAME string = tokenKeysSecretName
output WEBHOOK_SECRET_NAME string = webhookSecretName
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output MANAGED_IDENTITY_CLIENT_ID string = identity.outputs.clientId
@description('Subject of the federated credential for MS_CLIENT_CREDENTIAL=managed_identity: the identity\'s object (principal) id.')
output MANAGED_IDENTITY_PRINCIPAL_ID string = identity.outputs.principalId
@description('Issuer of the federated credential for MS_CLIENT_CREDENTIAL=managed_identity.')
output FEDERATED_CREDENTIAL_ISSUER string = '${environment().authentication.loginEndpoint}${tenant().tenantId}/v2.0'
output MS_CLIENT_CREDENTIAL string = msClientCredential
output MS_CLIENT_CERT_NAME string = msClientCertName
output NOTIFICATIONS_RESOURCE_DATA string = notificationsResourceData
output NOTIFICATION_CERT_NAME string = notificationCertName
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
